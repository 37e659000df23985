"""Does lean SFAS change skill? The dense reference and ``lean=True`` side by side, with seeds.

Lean SFAS differs from the dense path in one policy only (an entry that leaves the mask loses its
Adam moments and starts afresh when it re-enters; MaskedAdamW keeps them) and in a top-k that is
streamed (proven equal to the dense top-k at most refreshes, the count is recorded). This trains
SFAS and WeatherPEFT both ways on the comparison's settings (downscaling on ``tiny``, budget 4 %,
300 steps of batch 4, lr 3e-3: the rate both chose on validation in
``benchmarks/results/comparison-curves-cpu-tiny``), seeds 0-2, and tabulates the test RMSE of the
headline variable per seed and the paired lean − dense difference::

    python benchmarks/bench_lean_skill.py --work wpeft-runs/lean-skill \\
        --out benchmarks/results/lean-skill-cpu-tiny.md

Runs go to ``WORK/<method>-<dense|lean>-s<seed>`` (finished ones are skipped, so it resumes), two
worker processes of one thread each. About 20 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from report import write_report

METHODS = ("weatherpeft", "sfas")
SCORE = "rmse/2m_temperature"


def run_one(method: str, lean: bool, seed: int, work: Path, settings: dict) -> dict:
    """Train one run (in a worker process of one thread) and return its test score."""
    import torch

    torch.set_num_threads(1)
    from wpeft.runs.layout import SUMMARY
    from wpeft.training.loop import TrainConfig, train

    path = work / f"{method}-{'lean' if lean else 'dense'}-s{seed}"
    started = time.perf_counter()
    if not (path / SUMMARY).exists():
        cfg = TrainConfig(method=method, seed=seed, method_options={"lean": lean}, **settings)
        train(cfg, path, progress=False, resume=path.exists())
    summary = json.loads((path / SUMMARY).read_text())
    lean_info = summary["selection"].get("lean", {})
    return {
        "method": method, "lean": lean, "seed": seed, "score": summary["scores"][SCORE],
        "union": summary["selection"]["union"], "eligible": summary["selection"]["eligible"],
        "exact_refreshes": lean_info.get("exact_refreshes"),
        "refreshes": summary["selection"]["refreshes"],
        "seconds": time.perf_counter() - started,
    }


def table(rows: list[dict], settings: dict) -> str:
    by = {(r["method"], r["lean"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        (
            f"Downscaling on `tiny`, budget {settings['budget']:.0%}, {settings['steps']} steps "
            f"of batch {settings['batch_size']}, lr {settings['lr']}, seeds {seeds}; test "
            f"`{SCORE}` (K). Lean − dense is paired by seed."
        ),
        "",
        (
            "| method | dense (mean ± std) | lean (mean ± std) | lean − dense per seed "
            "| union dense / lean | lean refreshes proven exact |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        dense = [by[(method, False, s)] for s in seeds if (method, False, s) in by]
        lean = [by[(method, True, s)] for s in seeds if (method, True, s) in by]
        if not dense or not lean:
            continue

        def stat(rs: list[dict]) -> str:
            xs = [r["score"] for r in rs]
            return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.4f}"

        diffs = ", ".join(f"{b['score'] - a['score']:+.4f}" for a, b in zip(dense, lean))
        union = (
            f"{statistics.mean(r['union'] / r['eligible'] for r in dense):.1%} / "
            f"{statistics.mean(r['union'] / r['eligible'] for r in lean):.1%}"
        )
        exact = f"{sum(r['exact_refreshes'] for r in lean)} / {sum(r['refreshes'] for r in lean)}"
        lines.append(f"| {method} | {stat(dense)} | {stat(lean)} | {diffs} | {union} | {exact} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("wpeft-runs/lean-skill"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    settings = {"task": "downscaling", "budget": 0.04, "steps": args.steps, "batch_size": 4,
                "lr": 3e-3, "device": "cpu"}
    args.work.mkdir(parents=True, exist_ok=True)
    jobs = [(m, lean, s) for s in range(args.seeds) for m in METHODS for lean in (False, True)]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(run_one, m, lean, s, args.work, settings) for m, lean, s in jobs]
        rows = [f.result() for f in futures]
    for r in rows:
        print(f"{r['method']:<12} lean={r['lean']!s:<5} seed {r['seed']}: {r['score']:.4f} "
              f"({r['seconds']:.0f} s)")
    write_report(table(rows, settings), rows, args.out)


if __name__ == "__main__":
    main()
