"""The ``wpeft`` command: one entry point with sub-commands (also ``python -m wpeft``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from wpeft.errors import ConfigError, WpeftError
from wpeft.runs.layout import METRICS

if TYPE_CHECKING:
    from wpeft.training.compare import CompareConfig

__all__ = ["main"]


def _print_skill(card: dict) -> None:
    skill = card["heldout_skill"]
    print(
        f"Held-out 6-hour forecast skill on the embedded world ({card['heldout_samples']} samples), "
        "latitude-weighted RMSE:"
    )
    print(f"  {'variable':<10}{'model':>12}{'persistence':>14}{'ratio':>8}")
    for key, s in skill.items():
        print(f"  {key:<10}{s['model']:>12.4g}{s['persistence']:>14.4g}{s['ratio']:>8.3f}")
    ratios = [s["ratio"] for s in skill.values()]
    print(f"  mean RMSE ratio model / persistence: {sum(ratios) / len(ratios):.3f}")


def cmd_backbone_info(args: argparse.Namespace) -> int:
    from wpeft.backbones.aurora_adapter import build_backbone
    from wpeft.backbones.configs import PrithviConfig
    from wpeft.backbones.pretrain import load_pretrained, pretrained_card, shipped_backbones

    if args.name in shipped_backbones() or args.weights:
        model = load_pretrained(args.name, args.weights)
        card = pretrained_card(args.name, args.weights)
    else:
        model, card = build_backbone(args.name), None
    counts = model.num_parameters()
    cfg = model.config
    prithvi = isinstance(cfg, PrithviConfig)
    kind = "PrithviWxC.model.PrithviWxC" if prithvi else "aurora.Aurora"
    print(f"backbone {cfg.name!r} ({kind}, fingerprint {cfg.fingerprint()})")
    print(
        f"  parameters: {counts['total']:,} (encoder {counts['encoder']:,}, "
        f"backbone {counts['backbone']:,}, decoder {counts['decoder']:,})"
    )
    if prithvi:
        print(
            f"  embed_dim {cfg.embed_dim}, patch {cfg.patch_size}, mask unit "
            f"{cfg.mask_unit_size}, grid {cfg.grid}, {len(model.blocks)} transformer blocks "
            "(local / global attention)"
        )
    else:
        print(
            f"  embed_dim {cfg.embed_dim}, patch {cfg.patch_size}, window {cfg.window_size}, "
            f"{len(model.blocks)} Swin3D blocks, widths {sorted({b.dim for b in model.blocks})}"
        )
    print(f"  kernels E: {tuple(model.embedding_kernels().shape)} over {cfg.variables}")
    if card is None:
        print("  weights: random init (load a local checkpoint with --checkpoint in training)")
    else:
        print(f"  weights: {card['weights']} sha256 {card['sha256'][:16]}... (world {card['world_hash']})")
        _print_skill(card)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from wpeft.data.world import WorldConfig
    from wpeft.training.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(
        backbone=args.backbone,
        world=WorldConfig(seed=args.world_seed),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
    )
    card = pretrain(cfg, args.out, resume=not args.restart, progress=not args.quiet)
    print(f"wrote {Path(args.out) / card['weights']} and {args.backbone}.json")
    _print_skill(card)
    return 0


def cmd_world(args: argparse.Namespace) -> int:
    from wpeft.data.world import WorldConfig, open_world

    ds = open_world(WorldConfig(seed=args.seed), resolution=args.resolution)
    print(ds)
    return 0


def _print_method_help(name: str) -> None:
    """A method's settings: name, type, default and help, plus what it declares."""
    import textwrap

    from wpeft.methods.base import method_class, settings

    cls = method_class(name)
    print(f"{name}: {cls.summary}")
    knob = cls.size_knob or "- (fixed size)"
    print(f"  size knob: {knob}; default learning rate {cls.default_lr:g}")
    print(f"Settings (wpeft train --method {name} --method-option KEY=VALUE):")
    for s in settings(cls.Config):
        print(f"  {s.name}: {s.type} = {s.default!r}")
        print(textwrap.fill(s.help, width=96, initial_indent=" " * 6, subsequent_indent=" " * 6))


def cmd_methods(args: argparse.Namespace) -> int:
    """Table of registered methods with their trainable counts on a backbone, or one method's
    settings (``--help-method NAME``)."""
    if args.help_method is not None:
        _print_method_help(args.help_method)
        return 0
    from wpeft.backbones.aurora_adapter import build_backbone
    from wpeft.methods import METHODS, create_method

    rows = []
    for name in sorted(METHODS):
        method = create_method(name)
        method.apply(build_backbone(args.backbone))
        t = method.trainable()
        knob = METHODS[name].size_knob
        rows.append(
            (
                name,
                f"{knob}={getattr(method.config, knob)}" if knob else "-",
                t["backbone"],
                t["added"],
                t["encoder"] + t["decoder"],
                100 * method.budget_fraction(),
                METHODS[name].summary,
            )
        )
    print(f"Registered methods on the {args.backbone!r} backbone at their default size:")
    print(f"{'method':<16}{'knob':<22}{'backbone':>10}{'added':>10}{'enc+dec':>10}{'budget %':>10}  summary")
    for r in rows:
        print(f"{r[0]:<16}{r[1]:<22}{r[2]:>10,}{r[3]:>10,}{r[4]:>10,}{r[5]:>10.3f}  {r[6]}")
    return 0


def task_settings(args: argparse.Namespace) -> dict:
    """The task settings of ``--data FILE`` merged with ``--task-option KEY=VALUE``: the file's
    top-level keys first, then each ``--task-option``, which wins over the file for its key and
    replaces that key's value whole (a mapping such as ``world`` is not merged key by key)."""
    from wpeft.options import load_settings_file, parse_key_values, set_dotted

    from_file = load_settings_file(args.data, "--data") if args.data is not None else {}
    settings = dict(from_file)
    for key, value in parse_key_values(args.task_option, "--task-option").items():
        set_dotted(settings, key, value)  # data.region=[...] changes one field of data
    return settings


def cmd_train(args: argparse.Namespace) -> int:
    """One run. Task settings come from ``--data FILE.yaml`` and ``--task-option KEY=VALUE``
    (the option wins for its key, see :func:`task_settings`); ``--checkpoint PATH`` gives the
    backbone's weights (a local file of the ``--backbone`` architecture)."""
    from wpeft.options import parse_key_values
    from wpeft.training.loop import TrainConfig, train

    given = {
        name: getattr(args, name)
        for name in _RECIPE_OVERRIDABLE
        if getattr(args, name) is not None
    }
    common = dict(
        checkpoint=args.checkpoint,
        eval_every=args.eval_every,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        device=args.device,
        strategy=args.strategy,
        shard_optimizer=args.shard_optimizer,
    )
    method_options = parse_key_values(args.method_option, "--method-option")
    if args.recipe is not None:
        from wpeft.recipes import get_recipe

        recipe = get_recipe(args.recipe)
        paths = {name: getattr(args, f"{name}_path") for name in _RECIPE_PATHS}
        paths = {k: v for k, v in paths.items() if v is not None}
        options = recipe.train_options(
            paths, task_options=task_settings(args), method_options=method_options, **given
        )
        cfg = TrainConfig(**options, **common)
    else:
        for name in _RECIPE_PATHS:
            if getattr(args, f"{name}_path") is not None:
                raise ConfigError(
                    f"--{name}-path belongs to a recipe (--recipe NAME, see `wpeft recipes`); "
                    "without one, give the data with --data FILE.yaml or --task-option data.path=..."
                )
        cfg = TrainConfig(
            **(_TRAIN_DEFAULTS | given),
            method_options=method_options,
            task_options=task_settings(args),
            **common,
        )
    if not args.dry_run and args.out is None:
        raise ConfigError("wpeft train needs --out RUN_DIR (or --dry-run to print the plan).")
    if args.dry_run:
        from wpeft.distributed.launch import launch_plan

        plan = launch_plan(cfg)
        recipe = f" (recipe {args.recipe})" if args.recipe else ""
        print(f"wpeft train --dry-run{recipe}: {cfg.task} / {cfg.method} on the {cfg.backbone} backbone")
        print(f"  {'task settings':<26}{json.dumps(cfg.task_options)}")
        if cfg.method_options:
            print(f"  {'method settings':<26}{json.dumps(cfg.method_options)}")
        for key, value in plan.items():
            print(f"  {key:<26}{value}")
        from wpeft.training.loop import probe_budget

        match = probe_budget(cfg)  # None without --budget; refuses an infeasible one
        if match is not None:
            print(f"  {match.describe()}")
            print("    (probed on the backbone's variables; the run matches again with the "
                  "task's, which TADP's generators read)")
        return 0
    from wpeft.distributed.runtime import shutdown

    try:
        summary = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite,
                        progress=not args.quiet)
    finally:
        shutdown()
    if os.environ.get("RANK", "0") != "0":
        return 0  # rank 0 reports
    t = summary["trainable"]
    print(f"run {args.out}: {summary['method']} on {summary['task']}, budget "
          f"{100 * summary['budget_fraction']:.3f}% ({t['total'] - t['head']:,} trainable outside the head)")
    if summary.get("budget_match"):
        from wpeft.methods.budget import describe_budget

        print(f"  {describe_budget(summary['budget_match'])}")
    for key, value in summary["scores"].items():
        print(f"  {key:<40}{value:.5g}")
    return 0


#: ``wpeft train`` options a recipe sets and the command line may override, with their
#: defaults when no recipe is given.
_TRAIN_DEFAULTS = {
    "task": "downscaling", "method": "weatherpeft", "budget": None, "backbone": "tiny",
    "steps": 200, "batch_size": 4, "lr": 1e-3,
}
_RECIPE_OVERRIDABLE = tuple(_TRAIN_DEFAULTS)
#: The path names recipes take (``--data-path``, ...).
_RECIPE_PATHS = ("data", "coarse", "truth")


def cmd_recipes(args: argparse.Namespace) -> int:
    """List the recipes: task, what they set, the paths they need and an example command."""
    from wpeft.recipes import RECIPES

    for recipe in RECIPES.values():
        paths = " ".join(
            f"--{name}-path {recipe.example.get(name, 'PATH')}" for name in recipe.paths
        )
        print(f"{recipe.name}  ({recipe.task}, {recipe.method}, {recipe.backbone}, "
              f"budget {recipe.budget})")
        print(f"  {recipe.summary}")
        print(f"  wpeft train --recipe {recipe.name} {paths} \\")
        print(f"      --checkpoint aurora-0.25-pretrained.ckpt --out runs/{recipe.task}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Run (or resume) a tasks x methods x budgets x seeds matrix and write the tables. The task
    settings (``--data`` merged with ``--task-option``, see :func:`task_settings`) and the
    backbone (``--backbone``, ``--checkpoint``) apply to every run."""
    from wpeft.training.compare import (
        CompareConfig,
        collect,
        compare,
        lr_selection_table,
        tables,
        write_tables,
    )

    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds}: the number of seeds must be >= 1.")
    settings = task_settings(args)
    cfg = CompareConfig(
        tasks=tuple(args.tasks),
        methods=tuple(args.methods),
        budgets=tuple(args.budgets) if args.budgets else (None,),
        seeds=tuple(range(args.seeds)),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        lrs=tuple(args.lrs) if args.lrs else None,
        eval_every=args.eval_every,
        log_every=args.log_every,
        task_options={task: dict(settings) for task in args.tasks} if settings else {},
        backbone=args.backbone,
        checkpoint=args.checkpoint,
    )
    n = cfg.planned_runs()
    print(f"wpeft compare: {n} runs under {args.root} (finished ones are skipped)")
    compare(cfg, args.root, progress=not args.quiet)
    results = collect(args.root)
    reference = None if args.reference.lower() == "none" else args.reference
    markdown = tables(results, reference)
    for task, table in markdown.items():
        print(f"\n{task}\n{table}")
    if "lr_selection" in results.attrs:
        selection = json.loads(results.attrs["lr_selection"])
        print(f"\nlearning rate chosen on the validation split\n{lr_selection_table(selection)}")
    if args.tables:
        for path in write_tables(results, args.tables, reference, runs_root=args.root,
                                 markdown=markdown):
            print(f"wrote {path}")
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    """Write the figure set of one or more run directories."""
    from wpeft.viz.figures import write_figure_set

    missing = [r for r in args.runs if not Path(r).is_dir()]
    if missing:
        raise ConfigError(f"run directory {missing[0]} does not exist; give run directories (wpeft train --out ...).")
    paths = write_figure_set(args.runs, args.out, fmt=args.format, dpi=args.dpi)
    if not paths:
        raise ConfigError(
            f"nothing to draw in {', '.join(args.runs)}: no Fisher or attention records and no "
            "test fields yet (an unfinished run?); wait for the run to finish or pick finished runs."
        )
    print(f"wrote {len(paths)} figures to {args.out}")
    return 0


def demo_config(steps: int, budget: float) -> CompareConfig:
    """The demo's matrix: WeatherPEFT, Full-Tuning and LoRA on downscaling, one seed, with
    learning curves (the training loss every ~steps/40 steps, validation every ~steps/5: what
    the workbench's Curves view draws)."""
    from wpeft.training.compare import CompareConfig

    return CompareConfig(
        tasks=("downscaling",),
        methods=("weatherpeft", "full", "lora"),
        budgets=(budget,),
        seeds=(0,),
        steps=steps,
        batch_size=4,
        log_every=max(1, steps // 40),
        eval_every=max(1, steps // 5),
    )


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: fine-tune the pretrained tiny backbone on downscaling with WeatherPEFT,
    Full-Tuning and LoRA, and print the comparison."""
    from wpeft.runs.layout import FIELDS
    from wpeft.training.compare import collect, compare, tables

    print("wpeft demo: the pretrained tiny Aurora on the embedded synthetic world")
    cmd_backbone_info(argparse.Namespace(name="tiny", weights=None))
    cfg = demo_config(args.steps, args.budget)
    print(f"\nFine-tuning on global downscaling (coarse 8 x 16 -> fine 32 x 64), {args.steps} steps each:")
    compare(cfg, args.out, progress=not args.quiet)
    results = collect(args.out)
    for task, table in tables(results).items():
        print(f"\n{task} (test split; latitude-weighted RMSE in physical units)\n{table}")
    print("\nA short CPU run: see README 'Results' for the full comparison and what it shows.")
    print(f"\nRun directories (config, metrics, adapter, {FIELDS}): {Path(args.out).resolve()}")
    print(f"Look at them in a browser: wpeft serve {Path(args.out).parent}   (or wpeft figures ...)")
    return 0


def _add_task_and_backbone_arguments(
    p: argparse.ArgumentParser, every: str = "", backbone_default: str | None = "tiny"
) -> None:
    """``--task-option``, ``--data``, ``--backbone`` and ``--checkpoint`` (train and compare)."""
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help=f"a setting{every} (repeatable; VALUE is read as JSON where it can be); "
                        "wins over --data for its key")
    p.add_argument("--data", default=None, metavar="FILE.yaml",
                   help=f"YAML or JSON file whose top level maps setting names{every} to values "
                        "(nested mappings and lists allowed, e.g. world: {nlat: 16})")
    p.add_argument("--backbone", default=backbone_default,
                   help="architecture: tiny (default; weights ship with wpeft), small or 1.3b "
                        "(give --checkpoint); Prithvi-WxC prithvi-tiny (weights ship with "
                        "wpeft) or prithvi-2.3b (give --checkpoint)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="local weights of the --backbone architecture (safetensors or Aurora "
                        ".ckpt, downloaded once from the Aurora model card); Aurora's own "
                        "normalisation; recorded with its sha256 in the run")


#: Where ``wpeft lab`` finds the notebooks: ``notebooks/`` of the source checkout.
NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def lab_argv(port: int | None = None, *, browser: bool = True,
             notebooks: Path | None = None, extra: Sequence[str] = ()) -> list[str]:
    """The command ``wpeft lab`` runs: JupyterLab of this Python rooted at ``notebooks``
    (default :data:`NOTEBOOKS_DIR`), followed by ``extra`` JupyterLab options (a leading
    ``--`` separator is dropped).

    Raises:
        ConfigError: JupyterLab is not installed, or ``notebooks`` is not a directory (wpeft
            installed from a wheel has no notebooks: clone the repository).
    """
    if not _installed("jupyterlab"):
        raise ConfigError(
            "wpeft lab needs JupyterLab, which is not installed: pip install -e \".[app]\" "
            "(from the repository's folder)."
        )
    notebooks = NOTEBOOKS_DIR if notebooks is None else notebooks
    if not notebooks.is_dir():
        raise ConfigError(
            f"No notebooks folder at {notebooks}: wpeft lab opens notebooks/ of a source "
            "checkout (git clone the repository and pip install -e \".[app]\" there)."
        )
    argv = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={notebooks}"]
    if port is not None:
        argv.append(f"--port={port}")
    if not browser:
        argv.append("--no-browser")
    extra = list(extra)
    return argv + (extra[1:] if extra[:1] == ["--"] else extra)


def cmd_lab(args: argparse.Namespace) -> int:
    import subprocess

    argv = lab_argv(args.port, browser=not args.no_browser, extra=args.jupyter_args)
    print(" ".join(argv[1:]), flush=True)
    try:
        return subprocess.call(argv)
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wpeft",
        description="Parameter-efficient fine-tuning of weather foundation models (WeatherPEFT).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the main job on the embedded default data")
    d.add_argument("--out", default="wpeft-runs/demo", help="where the run directories go")
    d.add_argument("--steps", type=int, default=200, help="optimiser steps per method")
    d.add_argument("--budget", type=float, default=0.04, help="budget of the PEFT methods")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("backbone", help="inspect backbones")
    bsub = b.add_subparsers(dest="backbone_command", required=True)
    bi = bsub.add_parser("info", help="parameter count and held-out skill of a backbone")
    bi.add_argument("--name", default="tiny", help="tiny or prithvi-tiny (pretrained, shipped), small, 1.3b or prithvi-2.3b")
    bi.add_argument("--weights", default=None, help="directory with <name>.json + weights")
    bi.set_defaults(func=cmd_backbone_info)

    pt = sub.add_parser("pretrain", help="pretrain a backbone on the embedded world")
    pt.add_argument("--backbone", default="tiny")
    pt.add_argument("--out", required=True, help="output directory (checkpoints, weights, card)")
    pt.add_argument("--steps", type=int, default=1500)
    pt.add_argument("--batch-size", type=int, default=8)
    pt.add_argument("--lr", type=float, default=1e-3)
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--world-seed", type=int, default=0)
    pt.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    pt.add_argument("--quiet", action="store_true", help="no progress bar")
    pt.set_defaults(func=cmd_pretrain)

    t = sub.add_parser("train", help="fine-tune a backbone on a task with a method")
    t.add_argument("--recipe", default=None, metavar="NAME",
                   help="start from a named set-up (see `wpeft recipes`); options given here "
                        "override it")
    for name in _RECIPE_PATHS:
        t.add_argument(f"--{name}-path", default=None, metavar="PATH",
                       help=f"the recipe's {name} store or file (see `wpeft recipes`)")
    t.add_argument("--task", default=None, help="downscaling (default), postprocessing, precipitation")
    t.add_argument("--method", default=None, help="see `wpeft methods` (default: weatherpeft)")
    t.add_argument("--budget", type=float, default=None,
                   help="fraction of backbone parameters, e.g. 0.04 (default: method default); "
                        "a budget below the method's smallest size (WeatherPEFT: below TADP's "
                        "share) is refused with the smallest feasible one")
    t.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE")
    _add_task_and_backbone_arguments(t, backbone_default=None)
    t.add_argument("--steps", type=int, default=None, help="optimiser steps (default 200)")
    t.add_argument("--batch-size", type=int, default=None, help="global batch (default 4)")
    t.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3)")
    t.add_argument("--eval-every", type=int, default=0)
    t.add_argument("--log-every", type=int, default=0, metavar="N",
                   help=f"append the training loss every N optimiser steps to {METRICS} "
                        '(split "train"; 0: never)')
    t.add_argument("--checkpoint-every", type=int, default=50)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--strategy", default="auto", choices=("auto", "none", "ddp", "fsdp"),
                   help="data parallelism under torchrun (auto: DDP when WORLD_SIZE > 1)")
    t.add_argument("--shard-optimizer", action="store_true",
                   help="under DDP, shard the optimiser state over the ranks (ZeRO-1)")
    t.add_argument("--dry-run", action="store_true",
                   help="print the launch plan (world size, per-rank batch, sharding, precision, "
                        "checkpointing) and exit")
    t.add_argument("--out", default=None, help="run directory (required unless --dry-run)")
    t.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in --out from its checkpoint (--lr, --steps, "
                        "--checkpoint-every, --eval-every and --log-every may change; recorded "
                        "in the run)")
    t.add_argument("--overwrite", action="store_true",
                   help="remove the run already in --out and start again")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("recipes", help="the paper's set-ups: what each needs and how to start it")
    r.set_defaults(func=cmd_recipes)

    c = sub.add_parser("compare", help="tasks x methods x budgets x seeds, with paper-style tables")
    c.add_argument("--root", required=True, help="directory of the run directories")
    c.add_argument("--tasks", nargs="+", default=["downscaling"])
    c.add_argument("--methods", nargs="+", default=["weatherpeft", "full", "lora"])
    c.add_argument("--budgets", nargs="*", type=float, default=[0.04],
                   help="budgets of the methods with a size knob (default 0.04, feasible on tiny "
                        "for the default methods); a budget below a method's smallest size "
                        "(WeatherPEFT: TADP's share, about 3.7%% on tiny at 30 prompts) is "
                        "refused before any run starts, with the smallest feasible budget")
    c.add_argument("--seeds", type=int, default=1, help="number of seeds (0, 1, ...)")
    c.add_argument("--steps", type=int, default=200)
    c.add_argument("--batch-size", type=int, default=4)
    c.add_argument("--lr", type=float, default=None,
                   help="learning rate of every run (default: each method's default_lr)")
    c.add_argument("--lrs", nargs="+", type=float, default=None, metavar="LR",
                   help="learning rates to choose from on the validation split: every one runs "
                        "at the first seed, the best headline validation score's runs the other "
                        "seeds (needs --eval-every; written to ROOT/lr-selection.json)")
    c.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="evaluate the validation split every N steps in every run (learning "
                        f"curves in {METRICS}; 0: never)")
    c.add_argument("--log-every", type=int, default=0, metavar="N",
                   help=f"append every run's training loss every N steps to its {METRICS} "
                        '(split "train"; 0: never)')
    _add_task_and_backbone_arguments(c, every=" of every task")
    c.add_argument("--tables", default=None,
                   help="write markdown/CSV/netCDF tables here (with the lr choice and the "
                        "learning curves, when there are)")
    c.add_argument("--reference", default="full",
                   help="method whose scores the tables test the others against, marking "
                        "significant differences with * (default full; 'none': no markers)")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_compare)

    f = sub.add_parser("figures", help="the figure set of run directories (first run vs the others)")
    f.add_argument("runs", nargs="+", help="run directories (e.g. WeatherPEFT first, then Full-Tuning)")
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument("--format", default="png", choices=("png", "pdf", "svg"))
    f.add_argument("--dpi", type=int, default=150)
    f.set_defaults(func=cmd_figures)

    m = sub.add_parser("methods", help="table of registered fine-tuning methods")
    m.add_argument("--backbone", default="tiny")
    m.add_argument("--help-method", default=None, metavar="NAME",
                   help="list the settings of one method (name, type, default, help)")
    m.set_defaults(func=cmd_methods)

    from wpeft.distributed import plan as plan_module

    pl = sub.add_parser("plan", help="per-GPU memory of a fine-tuning job and the strategy that fits")
    plan_module.add_arguments(pl)
    pl.set_defaults(func=plan_module.main)

    from wpeft.app import serve as serve_module

    sv = sub.add_parser("serve", help="the Panel workbench over a runs directory (127.0.0.1 by default)")
    serve_module.add_arguments(sv)
    sv.set_defaults(func=serve_module.main)

    lab = sub.add_parser("lab", help="JupyterLab on the notebooks/ of this checkout (the app extra)")
    lab.add_argument("--port", type=int, default=None, help="port (default: JupyterLab's, 8888)")
    lab.add_argument("--no-browser", action="store_true", help="do not open a browser")
    lab.add_argument("jupyter_args", nargs=argparse.REMAINDER,
                     help="further JupyterLab options after --, e.g. wpeft lab -- --allow-root")
    lab.set_defaults(func=cmd_lab)

    w = sub.add_parser("world", help="generate (or open the cached) embedded world")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--resolution", choices=("fine", "coarse"), default="fine")
    w.set_defaults(func=cmd_world)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run a sub-command. Errors are one line on stderr: exit 2 for bad input, files or
    diverged training; 130 for an interruption (training saves a checkpoint first)."""
    from wpeft.training.loop import TrainingInterrupted

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TrainingInterrupted as e:
        again = " ".join(sys.argv if argv is None else ["wpeft", *argv])
        print(f"wpeft: {e}\n  {again} --resume", file=sys.stderr)
        return 130
    except WpeftError as e:
        print(f"wpeft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wpeft: interrupted. A training run continues from its last checkpoint with the same "
              "command plus --resume.", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"wpeft: error: {e}; check the path and its permissions.", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
