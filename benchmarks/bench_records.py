"""Overhead of the run records (Fisher-mask and prompt-attention recorders) on training time.

Trains the same run (tiny backbone, downscaling on the embedded world, a selection method) with
and without :func:`wpeft.runs.attach_recorders`, alternating, and prints the training time of
each (from the optimiser's creation to the end of the last optimiser step, record writing
included; the attention recorder's end-of-training recording is timed separately) and the ratio.

    python benchmarks/bench_records.py --method sfas --steps 60 --every 10 --repeats 3

The recorders are wired in as the training loop will call them (``on_step`` after every
optimiser step, ``close`` after the last) by wrapping ``prepare_run`` and the optimiser.

Wall-clock ratios are noisy on a shared machine, so two steadier measures are printed too: the
process CPU time of the same span (run with ``OMP_NUM_THREADS=1``: other processes' load then
barely enters), and the time spent *inside* the Fisher recorder (gradient sums before
``after_backward``, the capture after it, writing records and masks) as a share of the plain
training time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from wpeft.runs import attach_recorders
from wpeft.runs.fisher_records import FisherRecorder
from wpeft.training import loop
from wpeft.training.loop import TrainConfig

_INSIDE = {"seconds": 0.0}


def _timed(fn):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _INSIDE["seconds"] += time.perf_counter() - t

    return wrapper


# Everything the recorder adds to a training step runs in these three methods.
for _name in ("_grad_square_sums", "_capture", "on_step"):
    setattr(FisherRecorder, _name, _timed(getattr(FisherRecorder, _name)))


def timed_train(cfg: TrainConfig, run_dir: Path, *, record: bool, every: int) -> dict[str, Any]:
    """Train once; returns loop seconds, close seconds and the number of records."""
    marks: dict[str, Any] = {"steps": 0}
    _INSIDE["seconds"] = 0.0
    real_prepare = loop.prepare_run

    def prepare(c: TrainConfig, *args: Any):
        model, task, method, reference, info = real_prepare(c, *args)
        real_optimizer = method.optimizer

        def optimizer(lr: float, weight_decay: float = 0.0):
            opt = real_optimizer(lr, weight_decay)
            rec = attach_recorders(run_dir, method, model, task, every=every) if record else None
            marks["recorders"] = rec

            def post(o, args, kwargs) -> None:
                marks["steps"] += 1
                if rec is not None:
                    rec.on_step(marks["steps"])
                marks["end"] = time.perf_counter()
                marks["cpu_end"] = time.process_time()

            opt.register_step_post_hook(post)
            marks["start"] = time.perf_counter()
            marks["cpu_start"] = time.process_time()
            return opt

        method.optimizer = optimizer
        return model, task, method, reference, info

    loop.prepare_run = prepare
    try:
        loop.train(cfg, run_dir, progress=False)
    finally:
        loop.prepare_run = real_prepare
    close = 0.0
    n_records = 0
    rec = marks.get("recorders")
    if rec is not None:
        t = time.perf_counter()
        rec.close(cfg.steps)
        close = time.perf_counter() - t
        if rec.fisher is not None:
            n_records = len(rec.fisher.store.steps())
    inside = _INSIDE["seconds"]
    return {
        "loop": marks["end"] - marks["start"], "close": close, "records": n_records,
        "inside": inside, "cpu": marks["cpu_end"] - marks["cpu_start"],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="sfas")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=0.003)
    ap.add_argument("--small-world", action="store_true", help="16 x 32 world (quick check)")
    args = ap.parse_args(argv)
    options = {}
    if args.small_world:
        options = {"world": {"nlat": 16, "nlon": 32, "days": 12, "spinup_days": 1,
                             "ensemble_inits": 8, "ensemble_members": 3}}
    cfg = TrainConfig(
        task="downscaling", method=args.method, budget=args.budget, steps=args.steps,
        batch_size=args.batch, checkpoint_every=0, device="cpu", task_options=options,
    )
    plain, recorded, closes, inside = [], [], [], []
    cpu_plain, cpu_recorded = [], []
    with tempfile.TemporaryDirectory() as tmp:
        timed_train(cfg, Path(tmp) / "warm-up", record=False, every=args.every)
        for r in range(args.repeats):
            for record in (False, True):  # alternate, so load changes hit both alike
                run_dir = Path(tmp) / f"r{r}-{record}"
                out = timed_train(cfg, run_dir, record=record, every=args.every)
                (recorded if record else plain).append(out["loop"])
                (cpu_recorded if record else cpu_plain).append(out["cpu"])
                if record:
                    closes.append(out["close"])
                    inside.append(out["inside"])
                    n_records = out["records"]
                print(f"repeat {r} {'with' if record else 'without'} records: {out['loop']:.2f} s "
                      f"(CPU {out['cpu']:.2f} s)"
                      + (f" ({out['records']} Fisher records, {out['inside']:.3f} s inside the "
                         f"recorder, close {out['close']:.2f} s)" if record else ""),
                      flush=True)
    a, b = statistics.median(plain), statistics.median(recorded)
    print(f"\n{args.method}, {args.steps} steps, batch {args.batch}, every {args.every} "
          f"({n_records} Fisher records), median of {args.repeats}:")
    print(f"training time without records: {a:.2f} s")
    print(f"training time with records:    {b:.2f} s")
    print(f"ratio: {b / a:.4f} (overhead {100 * (b / a - 1):+.2f} %)")
    c, d = statistics.median(cpu_plain), statistics.median(cpu_recorded)
    print(f"CPU time without / with records: {c:.2f} s / {d:.2f} s, ratio {d / c:.4f} "
          f"(overhead {100 * (d / c - 1):+.2f} %)")
    fastest = min(plain)  # the least disturbed plain run
    print(f"time inside the Fisher recorder: {statistics.median(inside):.3f} s = "
          f"{100 * statistics.median(inside) / fastest:.2f} % of the fastest plain training time "
          f"({fastest:.2f} s)")
    print(f"end-of-training recording (close): {statistics.median(closes):.2f} s")
    ratios = [y / x for x, y in zip(plain, recorded)]
    print("per-repeat ratios: " + ", ".join(f"{x:.4f}" for x in ratios))


if __name__ == "__main__":
    sys.exit(main())
