"""SFAS with a cap on the union of its masks: skill, changed entries and adapter size, on the CPU.

SFAS redraws its top-k mask every step, so the entries it changes (the union of the masks, which
the adapter stores) grow far past the budget. ``union_cap`` bounds that union
(:mod:`wpeft.methods.sfas`). This trains SFAS at keep_ratio 0.003 (= budget 0.3%: SFAS trains
backbone entries only) on the synthetic downscaling task with the ``tiny`` backbone, with
``union_cap`` None, 0.003 (the first mask is kept) and 0.01, over a few seeds, and writes one
table: test RMSE (mean ± std over seeds), the changed share of the backbone and the adapter
file's size::

    nice -n 10 python benchmarks/bench_union_cap.py --steps 150 --seeds 3 \\
        --out benchmarks/results/union-cap-cpu-tiny.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from wpeft.training.loop import TrainConfig, train

KEEP_RATIO = 0.003
CAPS: tuple[float | None, ...] = (None, 0.003, 0.01)
VARIABLES = ("2m_temperature", "temperature_850", "geopotential_500")


def run(cap: float | None, seed: int, steps: int, root: Path) -> dict[str, Any]:
    """One SFAS run; its summary plus the adapter file's size in bytes."""
    options: dict[str, Any] = {"keep_ratio": KEEP_RATIO}
    if cap is not None:
        options["union_cap"] = cap
    cfg = TrainConfig(
        task="downscaling", method="sfas", method_options=options, backbone="tiny",
        steps=steps, seed=seed, device="cpu", eval_every=0, checkpoint_every=0,
        record_every=steps,
    )
    out = root / f"cap-{cap}" / f"seed-{seed}"
    summary = train(cfg, out, overwrite=True, progress=False)
    summary["adapter_bytes"] = (out / "adapter.safetensors").stat().st_size
    return summary


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4g} ± {std:.2g}"


def table(results: dict[float | None, list[dict[str, Any]]], steps: int, minutes: float) -> str:
    head = ["union_cap", "seeds", *(f"rmse {v}" for v in VARIABLES), "changed % of backbone",
            "adapter (kB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cap, runs in results.items():
        changed = [100 * r["changed"]["backbone"] / r["backbone_parameters"] for r in runs]
        row = [
            "none" if cap is None else f"{cap:g}",
            str(len(runs)),
            *(mean_std([r["scores"][f"rmse/{v}"] for r in runs]) for v in VARIABLES),
            mean_std(changed),
            mean_std([r["adapter_bytes"] / 1e3 for r in runs]),
        ]
        lines.append("| " + " | ".join(row) + " |")
    first_runs = next(iter(results.values()))
    first = first_runs[0]
    bilinear = first["scores"]
    lines.append("| *bilinear* | - | " + " | ".join(
        f"{bilinear[f'rmse_bilinear/{v}']:.4g}" for v in VARIABLES) + " | - | - |")
    return "\n".join(lines) + (
        f"\n\nSFAS, keep_ratio {KEEP_RATIO} (k = {first['trainable']['backbone']:,} of "
        f"{first['backbone_parameters']:,} backbone entries), synthetic downscaling, backbone "
        f"`tiny`, {steps} steps of batch {TrainConfig().batch_size}, device cpu "
        f"({platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads); "
        f"{sum(len(r) for r in results.values())} runs in {minutes:.1f} min on a shared 2-core "
        "machine. Made with `nice -n 10 python benchmarks/bench_union_cap.py --steps "
        f"{steps} --seeds {len(first_runs)} --out benchmarks/results/union-cap-cpu-tiny.md`.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("wpeft-runs/union-cap"),
                        help="run directories")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="markdown file for the table")
    args = parser.parse_args()

    started = time.perf_counter()
    results: dict[float | None, list[dict[str, Any]]] = {}
    for seed in range(args.seeds):  # seeds outermost: the table after each seed compares all caps
        for cap in CAPS:
            s = run(cap, seed, args.steps, args.root)
            results.setdefault(cap, []).append(s)
            print(f"cap={cap} seed={seed}: changed {s['changed']['backbone']:,}, adapter "
                  f"{s['adapter_bytes']:,} B, rmse t2m {s['scores']['rmse/2m_temperature']:.4f}",
                  flush=True)
        text = table(results, args.steps, (time.perf_counter() - started) / 60)
        print(text, flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
            print("wrote", args.out, flush=True)


if __name__ == "__main__":
    main()
