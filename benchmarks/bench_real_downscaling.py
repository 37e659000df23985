"""Downscaling on real data: ERA5 2 m temperature over the UK, 1° -> 0.25°, on the CPU.

The real sample is one month (March 2019) of hourly ERA5 2 m temperature on a 33 x 49 grid at
0.25° (the file xarray's tutorial ships). It is read once into a local zarr store (reading GRIB
a batch at a time costs ~0.5 s per batch), cropped to the part east of 10°W and west of 0°
(the backbone needs increasing longitudes in [0, 360), so the box cannot cross the prime
meridian), coarsened conservatively by 4 to 1° and fed back upsampled, as the paper's
downscaling does. The file holds 2 m temperature only, so every other input of the backbone is
fed as a constant at its normalisation mean (``fill_missing``, recorded in every run): the
backbone sees 2 m temperature and nothing else. Periods: train 1-21 March, val 22-25, test 26-31.

Runs go through ``wpeft compare`` (same tables as the synthetic comparison)::

    python benchmarks/bench_real_downscaling.py --steps 200 --seeds 3 \\
        --out benchmarks/results/real-downscaling-uk-cpu-tiny
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from wpeft.data.era5 import open_era5, write_wb2_zarr
from wpeft.training.compare import CompareConfig, collect, compare, tables, write_tables

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "era5-sample" / "era5-2mt-2019-03-uk.grib"
REGION = [50.25, 58.0, 350.0, 359.75]  # 32 x 40 points at 0.25°: 8 x 10 coarse cells of 1°


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sample", type=Path, default=SAMPLE, help="the ERA5 UK GRIB file")
    parser.add_argument("--root", type=Path, default=Path("wpeft-runs/real-downscaling"),
                        help="run directories and the zarr copy of the sample")
    parser.add_argument("--methods", nargs="+", default=["weatherpeft", "lora", "full"])
    parser.add_argument("--budget", type=float, default=0.04)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="folder for the tables")
    args = parser.parse_args()

    store = args.root / "era5-uk-t2m.zarr"
    if not store.exists():
        args.root.mkdir(parents=True, exist_ok=True)
        write_wb2_zarr(open_era5(args.sample, variables=["2m_temperature"]).load(), store)
    options = {
        "data": {
            "path": str(store),
            "variables": ["2m_temperature"],
            "region": REGION,
            "fill_missing": True,
            "train": ["2019-03-01", "2019-03-21"],
            "val": ["2019-03-22", "2019-03-25"],
            "test": ["2019-03-26", "2019-03-31"],
        },
        "coarse_factor": 4,
    }
    cfg = CompareConfig(
        tasks=("downscaling",),
        methods=tuple(args.methods),
        budgets=(args.budget,),
        seeds=tuple(range(args.seeds)),
        steps=args.steps,
        task_options={"downscaling": options},
    )
    started = time.perf_counter()
    summaries = compare(cfg, args.root / "runs")
    minutes = (time.perf_counter() - started) / 60
    results = collect(args.root / "runs")
    text = tables(results)["downscaling"]
    steps_per_s = [s["steps"] / s["train_seconds"] for s in summaries if s.get("train_seconds")]
    print(text)
    print(f"\n{len(summaries)} runs of {args.steps} steps in {minutes:.1f} min"
          + (f"; {min(steps_per_s):.2f}-{max(steps_per_s):.2f} steps/s" if steps_per_s else ""))
    if args.out is not None:
        for path in write_tables(results, args.out):
            print("wrote", path)


if __name__ == "__main__":
    main()
