"""The paper-style comparison: a matrix of tasks x methods x budgets x seeds.

Each cell is an ordinary run directory (``<root>/<task>/<method>-<budget>-s<seed>``); cells with
a ``summary.json`` are skipped, so an interrupted comparison resumes where it stopped. The
settings every cell shares (task settings, backbone and its weights) are not in the cell's
name: a root whose finished cells ran with other ones is refused before any run starts. The
tables (markdown + CSV + netCDF) hold mean ± std over seeds of every headline score and the
trainable fraction of backbone parameters; the netCDF's attributes hold each task's settings
and the backbone weights the runs recorded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from wpeft.backbones.aurora_adapter import WpeftAurora, check_weights_file
from wpeft.errors import ConfigError
from wpeft.methods.base import method_class
from wpeft.methods.budget import BudgetInfeasible
from wpeft.runs.layout import SUMMARY, RunFileError, RunLayout, read_json_object
from wpeft.tasks.base import Task
from wpeft.training.loop import TrainConfig, match_run_budget, probe_setup, train

__all__ = ["CompareConfig", "check_budgets", "collect", "compare", "tables"]


@dataclass
class CompareConfig:
    """The matrix and the settings shared by its runs (see :class:`TrainConfig`).

    ``task_options`` maps a task of ``tasks`` to its settings (``{"downscaling": {"world":
    {"nlat": 16}}}``), applied to every cell of that task; ``wpeft compare --task-option`` /
    ``--data`` give every task the same ones. ``backbone`` / ``checkpoint`` as in
    :class:`TrainConfig`. Every cell's config is checked when :meth:`cells` builds them, so a
    bad setting is refused before any run starts.
    """

    tasks: Sequence[str] = ("downscaling",)
    methods: Sequence[str] = ("weatherpeft", "full", "lora")
    budgets: Sequence[float | None] = (None,)
    seeds: Sequence[int] = (0,)
    steps: int = 200
    batch_size: int = 4
    lr: float | None = None  # None: each method's default_lr (Full-Tuning 3e-4, others 1e-3)
    record_every: int = 10  # interval of the Fisher-mask records (selection methods), in steps
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    backbone: str = "tiny"
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.task_options, dict):
            raise ConfigError(
                f"task_options={self.task_options!r} must map task names to their settings."
            )
        for task, options in self.task_options.items():
            if task not in self.tasks:
                raise ConfigError(
                    f"task_options names task {task!r}, which is not in tasks "
                    f"{list(self.tasks)}; key the settings by a task of the matrix."
                )
            if not isinstance(options, dict):
                raise ConfigError(
                    f"task_options[{task!r}]={options!r} must be a mapping of that task's settings."
                )

    def cells(self) -> list[TrainConfig]:
        """Every run of the matrix; methods without a size knob run once, at their own size."""
        import wpeft.methods  # noqa: F401  (registration)

        out = []
        for task in self.tasks:
            for method in self.methods:
                cls = method_class(method)
                budgets = self.budgets if cls.size_knob else (None,)
                for budget in budgets:
                    for seed in self.seeds:
                        lr = cls.default_lr if self.lr is None else self.lr
                        out.append(
                            TrainConfig(
                                task=task, method=method, budget=budget, seed=seed,
                                steps=self.steps, batch_size=self.batch_size, lr=lr,
                                record_every=self.record_every,
                                task_options=dict(self.task_options.get(task, {})),
                                backbone=self.backbone, checkpoint=self.checkpoint,
                            )
                        )
        return out


def run_dir(root: Path, cfg: TrainConfig) -> Path:
    budget = "default" if cfg.budget is None else f"{100 * cfg.budget:g}pct"
    return root / cfg.task / f"{cfg.method}-{budget}-s{cfg.seed}"


def check_finished_cells(cells: Sequence[TrainConfig], root: Path) -> None:
    """Refuse finished cells under ``root`` that ran with other settings than ``cells`` (task
    settings, backbone, weights, batch size: what is not in a cell's name), as a resume would
    (:meth:`TrainConfig.same_run`): learning rate and length may differ. A cell whose
    ``config.json`` cannot be read is left alone."""
    for cfg in cells:
        d = RunLayout(run_dir(root, cfg))
        if not d.finished:
            continue
        try:
            previous = read_json_object(d.config)
        except RunFileError:
            continue
        differ = cfg.differences(previous) if previous is not None else []
        if differ:
            raise ConfigError(
                f"{d.path} holds a finished run with other settings ({', '.join(differ)} "
                "differ); use another --root for these settings, or remove that run."
            )


def check_budgets(cells: Sequence[TrainConfig]) -> None:
    """Refuse, in one :class:`ConfigError`, every (task, method, budget) of ``cells`` that the
    method cannot reach, each with its smallest (or largest) feasible budget. Budgets are
    matched on probes with the task's variables (:func:`match_run_budget`; each task is set up
    once, :func:`probe_setup`), before any run."""
    probes: dict[str, tuple[Task, WpeftAurora]] = {}
    seen: set[tuple[str, str, float]] = set()
    refused: list[str] = []
    smallest: list[float] = []
    for cfg in cells:
        if cfg.budget is None or (cfg.task, cfg.method, cfg.budget) in seen:
            continue
        seen.add((cfg.task, cfg.method, cfg.budget))
        if cfg.task not in probes:
            probes[cfg.task] = probe_setup(cfg)
        try:
            match_run_budget(cfg, *probes[cfg.task])
        except BudgetInfeasible as e:
            if e.smallest is not None:
                smallest.append(e.smallest)
                bound = f"smallest feasible budget {e.smallest:g}"
            else:
                bound = f"largest feasible budget {e.largest:g}"
            refused.append(f"  {cfg.task} / {cfg.method} / budget {cfg.budget:g}: {bound}")
    if refused:
        hint = f" (--budgets {max(smallest):g} or more suits them)" if smallest else ""
        raise ConfigError(
            f"{len(refused)} cell(s) of the comparison ask for a budget their method cannot "
            "reach; no run was started:\n" + "\n".join(refused) + "\nGive budgets every "
            f"method can reach{hint}, or leave those methods out."
        )


def compare(config: CompareConfig, root: str | Path, *, progress: bool = True) -> list[dict]:
    """Run (or resume) every cell; return the summaries. Every cell's settings, the backbone
    checkpoint (readable), the finished cells under ``root`` (:func:`check_finished_cells`)
    and every budget (:func:`check_budgets`) are checked before the first run starts."""
    root = Path(root)
    cells = config.cells()
    if config.checkpoint is not None:
        check_weights_file(cells[0].checkpoint if cells else config.checkpoint)
    check_finished_cells(cells, root)
    check_budgets([c for c in cells if not RunLayout(run_dir(root, c)).finished])
    summaries = []
    for cfg in cells:
        d = RunLayout(run_dir(root, cfg))
        if d.finished:
            summaries.append(json.loads(d.summary.read_text()))
            continue
        # an interrupted cell continues (or restarts, if killed before its first checkpoint)
        summaries.append(train(cfg, d.path, resume=d.path.exists(), progress=progress))
    return summaries


def collect(root: str | Path) -> xr.Dataset:
    """All finished runs under ``root`` as one Dataset with dims (task, method, budget, seed):
    one variable per score plus ``budget_percent`` (trainable share of the backbone)."""
    layouts = [RunLayout(d) for d in sorted(Path(root).glob("*/*"))]
    rows = [json.loads(d.summary.read_text()) for d in layouts if d.finished]
    if not rows:
        raise FileNotFoundError(f"No finished runs ({SUMMARY}) under {root}.")
    tasks = sorted({r["task"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    budgets = sorted({"default" if r["budget"] is None else f"{100 * r['budget']:g}%" for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    keys = sorted({k for r in rows for k in r["scores"]}) + ["budget_percent"]
    data = {k: np.full((len(tasks), len(methods), len(budgets), len(seeds)), np.nan) for k in keys}
    for r in rows:
        b = "default" if r["budget"] is None else f"{100 * r['budget']:g}%"
        idx = (tasks.index(r["task"]), methods.index(r["method"]), budgets.index(b), seeds.index(r["seed"]))
        for k, v in r["scores"].items():
            data[k][idx] = v
        data["budget_percent"][idx] = 100 * r["budget_fraction"]
    dims = ("task", "method", "budget", "seed")
    return xr.Dataset(
        {k.replace("/", ":"): (dims, v) for k, v in data.items()},
        coords={"task": tasks, "method": methods, "budget": budgets, "seed": seeds},
        attrs=_shared_settings(rows, tasks),
    )


def _shared_settings(rows: list[dict], tasks: list[str]) -> dict[str, str]:
    """JSON text of what the runs recorded about their task (``task_config:<task>``) and
    backbone weights (``backbone_weights``): the one value all runs share, or a JSON list of
    the different values when runs differ."""

    def one_or_all(values: list[Any]) -> str:
        texts = list(dict.fromkeys(json.dumps(v, sort_keys=True) for v in values))
        return texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"

    attrs = {
        f"task_config:{task}": one_or_all([r.get("task_config") for r in rows if r["task"] == task])
        for task in tasks
    }
    attrs["backbone_weights"] = one_or_all([r.get("backbone_weights") for r in rows])
    return attrs


#: Scores of a reference that does not depend on the method (shown once, as its own row).
#: Score prefix -> (reference name, the method score it stands beside).
REFERENCES = {
    "rmse_bilinear": ("bilinear interpolation", "rmse"),
    "rmse_persistence": ("persistence", "rmse"),
    "acc_persistence": ("persistence", "acc"),
    "seeps_persistence": ("persistence", "seeps"),
    "crps_raw": ("raw ensemble", "crps"),
    "rmse_raw": ("raw ensemble", "rmse"),
}


def _headline_columns(sub: xr.Dataset, task: str) -> tuple[list[str], dict[str, list[str]]]:
    """Score columns of the task's headline variables, and reference columns by prefix."""
    from wpeft.tasks import TASKS

    headline = getattr(TASKS.get(task), "headline", ())
    main, refs = [], {}
    for v in sub.data_vars:
        if v == "budget_percent" or not np.isfinite(sub[v]).any():
            continue
        prefix, _, var = str(v).partition(":")
        if headline and not any(var == h or var.startswith(f"{h}_") for h in headline):
            continue
        if prefix in REFERENCES:
            refs.setdefault(prefix, []).append(str(v))
        else:
            main.append(str(v))
    return main, refs


def tables(results: xr.Dataset) -> dict[str, str]:
    """One markdown table per task: rows method x budget, columns the trainable share of the
    backbone and the headline scores, cells mean ± std over seeds; references last."""
    out = {}
    for task in results.task.values:
        sub = results.sel(task=task)
        main, refs = _headline_columns(sub, str(task))
        cols = ["budget_percent"] + main
        names = ["trainable % of backbone"] + [c.replace(":", " ") for c in main]
        lines = ["| method | budget | seeds | " + " | ".join(names) + " |", "|---" * (len(cols) + 3) + "|"]

        def fmt(x: np.ndarray) -> str:
            x = x[np.isfinite(x)]
            if len(x) == 0:
                return "-"
            return f"{x.mean():.4g} ± {x.std():.2g}" if len(x) > 1 else f"{x.mean():.4g}"

        for method in sub.method.values:
            for budget in sub.budget.values:
                cell = sub.sel({"method": method, "budget": budget})
                n = int(np.isfinite(cell["budget_percent"]).sum())
                if n:
                    vals = [fmt(cell[c].values) for c in cols]
                    lines.append(f"| {method} | {budget} | {n} | " + " | ".join(vals) + " |")
        labels = dict.fromkeys(REFERENCES[p][0] for p in refs)
        for label in labels:
            vals = ["-"]
            for c in main:
                metric, _, var = c.partition(":")
                ref = next(
                    (f"{p}:{var}" for p in refs if REFERENCES[p] == (label, metric)), None
                )
                x = sub[ref].values.ravel() if ref in sub else np.array([])
                x = x[np.isfinite(x)]
                vals.append(f"{x[0]:.4g}" if len(x) else "-")  # the same for every method
            lines.append(f"| *{label}* | - | - | " + " | ".join(vals) + " |")
        out[str(task)] = "\n".join(lines)
    return out


def write_tables(results: xr.Dataset, out_dir: str | Path) -> list[Path]:
    """Markdown and CSV per task plus the whole Dataset as netCDF; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for task, md in tables(results).items():
        p = out / f"{task}.md"
        p.write_text(md + "\n")
        paths.append(p)
        df = results.sel(task=task).to_dataframe().dropna(how="all")
        c = out / f"{task}.csv"
        df.to_csv(c)
        paths.append(c)
    nc = out / "comparison.nc"
    results.to_netcdf(nc)
    paths.append(nc)
    return paths

