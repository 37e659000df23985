"""The method comparison on `tiny` with learning curves and a learning rate chosen on validation.

Each group of methods is one ``wpeft compare`` with its own learning rates to choose from (the
choice is made at seed 0 on the validation split, the other seeds run at the chosen rate;
``lr-selection.json``): Full-Tuning from {3e-4, 1e-3}, the PEFT methods from {1e-3, 3e-3}.
Groups run in parallel worker processes of one thread each (two on a 2-core machine), each in
``WORK/<group>``; finished runs are skipped, so the script resumes. The groups are then merged
into ``WORK/merged`` (the run directories, their files hard-linked, and one ``lr-selection.json``) and the
tables are written from it: sizes, mean ± std over seeds, scores marked where they differ from
Full-Tuning's (paired t-test with AR(1) effective sample size), the lr choice and the
validation curves::

    python benchmarks/bench_comparison.py --work wpeft-runs/comparison \\
        --out benchmarks/results/comparison-curves-cpu-tiny

Defaults: downscaling, budget 4 %, 300 steps of batch 4 (cosine schedule), validation every 50
steps, 3 seeds, the ``tiny`` Aurora. About an hour on 2 CPU cores. ``--backbone prithvi-tiny
--methods weatherpeft,sfas,tadp,lora,full`` runs the Prithvi-WxC table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

#: group name -> (methods, learning rates to choose from)
GROUPS = {
    "A": (("full",), (3e-4, 1e-3)),
    "B": (("weatherpeft", "sfas"), (1e-3, 3e-3)),
    "C": (("lora", "tadp", "child_tuning_d"), (1e-3, 3e-3)),
}


def group_methods(name: str, only: tuple[str, ...] | None) -> tuple[str, ...]:
    """The methods of group ``name``, restricted to ``only`` (None: all)."""
    return tuple(m for m in GROUPS[name][0] if only is None or m in only)


def run_group(name: str, root: Path, settings: dict, only: tuple[str, ...] | None = None) -> str:
    """One ``compare`` of a group (in a worker process of one thread)."""
    import torch

    torch.set_num_threads(1)
    from wpeft.training.compare import CompareConfig, compare

    methods, lrs = group_methods(name, only), GROUPS[name][1]
    cfg = CompareConfig(methods=methods, lrs=lrs, **settings)
    started = time.perf_counter()
    compare(cfg, root, progress=False)
    return f"group {name} ({', '.join(methods)}): {time.perf_counter() - started:.0f} s"


def merge_roots(roots: list[Path], merged: Path) -> None:
    """Every run directory of ``roots`` under ``merged`` (files hard-linked: run discovery skips
    symbolic links that leave the root) and one ``lr-selection.json`` holding every group's
    choices."""
    from wpeft.training.compare import LR_SELECTION, read_lr_selection

    choices, lrs, rule = [], set(), None
    for root in roots:
        for run in sorted(root.glob("*/*")):
            if run.is_dir():
                copy = merged / run.parent.name / run.name
                if not copy.exists():
                    shutil.copytree(run, copy, copy_function=os.link)
        selection = read_lr_selection(root)
        if selection is None:
            raise SystemExit(f"{root} has no {LR_SELECTION}: its comparison has not finished.")
        choices += selection["choices"]
        lrs |= set(selection["lrs"])
        rule = selection["rule"]
    merged_selection = {"rule": rule, "seed": 0, "lrs": sorted(lrs), "choices": choices}
    (merged / LR_SELECTION).write_text(json.dumps(merged_selection, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("wpeft-runs/comparison"))
    parser.add_argument("--out", type=Path, default=None, help="folder for the tables")
    parser.add_argument("--task", default="downscaling")
    parser.add_argument("--budget", type=float, default=0.04)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backbone", default="tiny", help="tiny or prithvi-tiny (shipped, pretrained)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset of the groups' methods (default: all)")
    args = parser.parse_args()
    known = {m for methods, _ in GROUPS.values() for m in methods}
    only = None if args.methods is None else tuple(args.methods.split(","))
    if only is not None and set(only) - known:
        raise SystemExit(f"--methods: unknown {sorted(set(only) - known)}; choose from {sorted(known)}.")
    groups = [g for g in GROUPS if group_methods(g, only)]

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    settings = {"tasks": (args.task,), "budgets": (args.budget,), "seeds": tuple(range(args.seeds)),
                "steps": args.steps, "eval_every": args.eval_every, "backbone": args.backbone}
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        jobs = [pool.submit(run_group, g, args.work / f"root{g}", settings, only) for g in groups]
        for job in jobs:
            print(job.result())

    from wpeft.training.compare import collect, lr_selection_table, tables, write_tables

    merged = args.work / "merged"
    merge_roots([args.work / f"root{g}" for g in groups], merged)
    results = collect(merged)
    markdown = tables(results, "full")
    for task, table in markdown.items():
        print(f"\n{task}\n{table}")
    print("\n" + lr_selection_table(json.loads(results.attrs["lr_selection"])))
    if args.out is not None:
        for path in write_tables(results, args.out, "full", runs_root=merged, markdown=markdown):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
