"""The memory planner's activation estimate against exact measurements, on the device at hand.

For tiny and small backbones, three methods and two grids it measures the bytes autograd saves
for backward in one forward (``wpeft.distributed.activations.measure_saved_bytes``: unique storages,
parameters excluded) at batch 1 and 2, and prints measured / estimated per region (Swin blocks
per sample, merges, encoder, decoder) and for the whole forward at batch 2. On a GPU with bf16
this is the check of the CUDA-autocast constants (LayerNorm and the residual stream in fp32)
that a CPU cannot make; ratios near 1 confirm them.

    python benchmarks/gpu/check_plan.py --device cuda --out $OUT/check_plan.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
for path in (REPO, REPO / "benchmarks"):  # wpeft from a checkout; the shared report writer
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from report import write_report
from wpeft.backbones.aurora_adapter import build_backbone
from wpeft.data.batch import random_batch
from wpeft.distributed.activations import estimate_activations, measure_saved_bytes, model_regions
from wpeft.distributed.inventory import inventory
from wpeft.methods import create_method

LEVELS = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)


def measured(
    backbone: str,
    method: str,
    grid: tuple[int, int],
    batch: int,
    levels: int,
    device: torch.device,
    precision: str,
) -> dict[str, int]:
    torch.manual_seed(0)
    with torch.device(device):
        model = build_backbone(backbone)
        m = create_method(method)
        m.apply(model)
    model.autocast_backbone = precision == "bf16"
    cfg = model.config
    b = random_batch(
        cfg.surf_vars,
        cfg.static_vars,
        cfg.atmos_vars,
        batch_size=batch,
        grid=grid,
        levels=LEVELS[:levels],
    ).to(device)
    return measure_saved_bytes(
        model, b, regions=model_regions(model, m.added), exclude=list(m.parameters())
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--backbones", nargs="+", default=["tiny", "small"])
    p.add_argument("--methods", nargs="+", default=["full", "lora", "weatherpeft"])
    p.add_argument("--grids", nargs="+", default=["64x128", "96x192"])
    p.add_argument("--levels", type=int, default=13)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    t0 = time.perf_counter()
    for backbone in args.backbones:
        for method in args.methods:
            inv = inventory(backbone, method)
            for g in args.grids:
                grid = tuple(int(x) for x in g.split("x"))
                m1 = measured(backbone, method, grid, 1, args.levels, device, args.precision)
                m2 = measured(backbone, method, grid, 2, args.levels, device, args.precision)
                e1 = estimate_activations(inv, grid, 1, args.levels, args.precision)
                e2 = estimate_activations(inv, grid, 2, args.levels, args.precision)

                def ratio(region: str, est1: int, est2: int, m1=m1, m2=m2) -> float | None:
                    meas = m2.get(region, 0) - m1.get(region, 0)
                    est = est2 - est1
                    return meas / est if est else None

                rows.append(
                    {
                        "backbone": backbone,
                        "method": method,
                        "grid": g,
                        "blocks": ratio("blocks", e1.blocks, e2.blocks),
                        "merges": ratio("merges", e1.merges, e2.merges),
                        "encoder": ratio("encoder", e1.encoder, e2.encoder),
                        "decoder": ratio("decoder", e1.decoder, e2.decoder),
                        "total": m2["total"] / e2.full,
                        "measured_b2": m2,
                        "estimated_b2": e2.full,
                    }
                )
                print(
                    f"{backbone} {method} {g}: total measured/estimated "
                    f"{rows[-1]['total']:.3f} ({time.perf_counter() - t0:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = (
        f"Planner activations, measured / estimated ({device.type}: {name}, torch "
        f"{torch.__version__}, {args.precision}, {args.levels} levels). Regions per sample "
        "(batch 2 - batch 1); total = whole forward at batch 2 (weight copies and TADP "
        "generators included)."
    )
    lines = [
        header,
        "",
        "| backbone | method | grid | blocks | merges | encoder | decoder | total |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backbone']} | {r['method']} | {r['grid']} | {f(r['blocks'])} "
            f"| {f(r['merges'])} | {f(r['encoder'])} | {f(r['decoder'])} | {f(r['total'])} |"
        )
    write_report("\n".join(lines), rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
