"""Adapter file sizes: what a fine-tuned method costs on disk, compact encodings vs int64 indices.

Trains each method on the downscaling task of the embedded world (``tiny`` backbone), then
measures its adapter file as written (selection indices in the smallest of int32, delta varints
or a bitmask) and as the same tensors would be stored with int64 indices (wpeft 0.1.0's format),
beside the backbone's own float32 size::

    python benchmarks/bench_adapter_sizes.py --steps 40 --out benchmarks/results/adapters-cpu-tiny.md
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from report import write_report
from safetensors.torch import load_file, save_file

from wpeft.methods.adapter_file import decode_selection
from wpeft.runs.layout import RunLayout
from wpeft.training.loop import TrainConfig, train

CASES = (("weatherpeft", 0.04), ("sfas", 0.003), ("sfas", 0.04), ("lora", 0.04), ("full", None))


def measure(method: str, budget: float | None, steps: int, root: Path) -> dict:
    cfg = TrainConfig(method=method, budget=budget, steps=steps, checkpoint_every=0, device="cpu")
    run = RunLayout(root / f"{method}-{budget}")
    summary = train(cfg, run.path, progress=False)
    stored = run.adapter.with_suffix(".safetensors")
    legacy = decode_selection(load_file(str(stored)))  # int64 <name>.indices, as 0.1.0 stored them
    with tempfile.TemporaryDirectory() as tmp:
        save_file(legacy, f"{tmp}/legacy.safetensors")
        legacy_bytes = Path(f"{tmp}/legacy.safetensors").stat().st_size
    backbone_bytes = 4 * summary["backbone_parameters"]
    return {
        "method": method,
        "budget": budget,
        "steps": steps,
        "trainable_backbone": summary["trainable"]["backbone"],
        "changed_backbone": summary["changed"]["backbone"],
        "adapter_bytes": stored.stat().st_size,
        "int64_bytes": legacy_bytes,
        "backbone_float32_bytes": backbone_bytes,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| method | budget | steps | trainable backbone | changed backbone | adapter MB | with int64 "
        "indices MB | compact / int64 | adapter / backbone float32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        budget = "default" if r["budget"] is None else f"{100 * r['budget']:g}%"
        lines.append(
            f"| {r['method']} | {budget} | {r['steps']} | {r['trainable_backbone']:,} | "
            f"{r['changed_backbone']:,} | {r['adapter_bytes'] / 1e6:.2f} | "
            f"{r['int64_bytes'] / 1e6:.2f} | {r['adapter_bytes'] / r['int64_bytes']:.2f} | "
            f"{r['adapter_bytes'] / r['backbone_float32_bytes']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", type=Path, default=None, help="write the Markdown table (+ .json) here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        rows = [measure(m, b, args.steps, Path(root)) for m, b in CASES]
    text = (
        f"Adapter sizes on `tiny`, downscaling on the embedded world, {args.steps} AdamW steps of "
        "batch 4 (CPU; `benchmarks/bench_adapter_sizes.py`). 'with int64 indices' re-stores the "
        "same tensors as wpeft 0.1.0 did. Selection methods change more entries than their "
        "per-step k (a fresh mask every step), so their adapters grow with the steps.\n\n"
        + table(rows)
    )
    write_report(text, rows, args.out)


if __name__ == "__main__":
    main()
