"""Training-step speed, peak memory and MFU of wpeft methods on Aurora backbones, on one GPU.

For each backbone (random weights, real shapes) and method, in eager mode and with the Swin
blocks compiled (``torch.compile``), it runs bf16 training steps the way ``wpeft train`` does
on a GPU (Aurora's autocast of the backbone; forward, backward, the method's
``after_backward`` hook, the optimiser step) and reports:

* step time: median over the timed steps after warm-up (CUDA events), first-step time (which
  holds the compilation);
* throughput in samples/s and model FLOP utilisation against a dense bf16 peak (989 TFLOP/s,
  H100/H200 SXM), FLOPs counted with ``torch.utils.flop_counter.FlopCounterMode`` on one eager
  step (forward + backward);
* peak memory (``torch.cuda.max_memory_allocated`` over the steps) against the planner's
  estimate for the same configuration (``wpeft.distributed.plan``, one GPU), as a ratio.

A configuration that fails (OOM, a compile error, its own time limit) is recorded as
``failed: reason`` and the next one runs. Eager rows come first, compiled rows after, and no
configuration starts once the time budget is spent, so an unattended run always ends with a
table (stdout and ``--out``, plus the rows as JSON next to it).

    python benchmarks/bench_gpu.py --quick --out results/gpu.md                 # < 5 minutes
    python benchmarks/bench_gpu.py --grid 721x1440 --checkpointing --backbones 1.3b
    python benchmarks/bench_gpu.py --device cpu --backbones tiny --steps 2      # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import platform
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from report import write_report  # benchmarks/, beside this script
from bench_methods import method_spec  # "weatherpeft+lean" -> ("weatherpeft", {"lean": True})
from wpeft.backbones.aurora_adapter import build_backbone
from wpeft.data.batch import random_batch
from wpeft.distributed.plan import PlanRequest, parse_grid, plan
from wpeft.methods import create_method

#: Dense bf16 tensor-core peak of an H100 / H200 SXM, FLOP/s.
PEAK_FLOPS = 989e12
#: WeatherBench2's 13 pressure levels (hPa).
LEVELS = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)


class ConfigTimeout(Exception):
    """A configuration ran past its own time limit."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`ConfigTimeout` in the main thread after ``seconds`` (SIGALRM, POSIX)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise ConfigTimeout(f"over its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loss(pred: Any) -> torch.Tensor:
    """Scale-free squared prediction over every output (each variable normalised by its own
    magnitude), so every decoder head takes part and nothing overflows with random weights."""
    parts = [*pred.surf_vars.values(), *pred.atmos_vars.values()]
    return sum((v.float() / (v.detach().float().abs().mean() + 1.0)).pow(2).mean() for v in parts)


def _compile_blocks(model: torch.nn.Module) -> None:
    """Compile every Swin block in place (the blocks hold nearly all FLOPs; the encoder and
    decoder take Aurora's ``Batch`` objects and stay eager)."""
    import torch._dynamo as dynamo

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), 256))
    for info in model.blocks:
        info.block.compile()


def measure(
    backbone: str,
    method_name: str,
    *,
    compiled: bool,
    device: torch.device,
    grid: tuple[int, int],
    batch_size: int,
    levels: int,
    steps: int,
    warmup: int,
    checkpointing: bool,
    precision: str,
) -> dict[str, Any]:
    """One configuration: build, warm up, time ``steps`` steps, count FLOPs of one step."""
    torch.manual_seed(0)
    with torch.device(device):
        model = build_backbone(backbone)
        with torch.no_grad():  # leave Aurora's identity initialisation so every block matters
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        name, kwargs = method_spec(method_name)
        method = create_method(name, **kwargs)
        method.apply(model)
    model.autocast_backbone = precision == "bf16"
    if checkpointing:
        model.configure_activation_checkpointing()
    if compiled:
        _compile_blocks(model)
    cfg = model.config
    batch = random_batch(
        cfg.surf_vars,
        cfg.static_vars,
        cfg.atmos_vars,
        batch_size=batch_size,
        grid=grid,
        levels=LEVELS[:levels],
    ).to(device)
    opt = method.optimizer(lr=1e-4, weight_decay=0.01)
    total = warmup + steps

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        method.before_backward(i, total)
        _loss(model(batch)).backward()
        method.after_backward(i, total)
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    for i in range(total):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    flops = None
    if not compiled:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        try:
            with counter:
                opt.zero_grad(set_to_none=True)
                method.before_backward(total - 1, total)
                _loss(model(batch)).backward()
                method.after_backward(total - 1, total)
            flops = counter.get_total_flops()
        except torch.OutOfMemoryError:
            # Counting runs under a dispatch mode that can hold more than a plain step (seen
            # with checkpointing at 0.25 deg): keep the timed steps, leave FLOPs/MFU empty.
            flops = None
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    timed = times[warmup:] or times
    step_s = statistics.median(timed)
    return {
        "step_s": step_s,
        "first_step_s": times[0],
        "samples_per_s": batch_size / step_s,
        "peak_bytes": peak,
        "flops": flops,
        "trainable": method.trainable()["total"],
    }


def planned_peak(
    backbone: str,
    method: str,
    grid: tuple[int, int],
    batch: int,
    levels: int,
    precision: str,
    checkpointing: bool,
) -> int | None:
    """The planner's one-GPU peak for the same configuration."""
    name, options = method_spec(method)
    try:
        p = plan(
            PlanRequest(
                backbone,
                name,
                1,
                batch,
                grid,
                precision=precision,
                activation_checkpointing=checkpointing,
                levels=levels,
                method_options=options,
            )
        )
    except Exception as e:  # noqa: BLE001  (the benchmark reports, it does not stop)
        print(f"planner failed for {backbone}/{method}: {e}", file=sys.stderr)
        return None
    return p.strategy("none+ckpt" if checkpointing else "none").peak


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: Sequence[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        (
            "| backbone | method | compile | step (ms) | first step (s) | samples/s | TFLOP/step "
            "| MFU % | peak (GiB) | planned (GiB) | peak / planned | status |"
        ),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    flops_of = {(r["backbone"], r["method"]): r.get("flops") for r in rows if r.get("flops")}
    for r in rows:
        flops = flops_of.get((r["backbone"], r["method"]))
        ok = r["status"] == "ok"
        step_s = r.get("step_s") if ok else None
        mfu = (
            100 * flops / step_s / PEAK_FLOPS
            if flops and step_s and r["device"] == "cuda"
            else None
        )
        peak, planned = r.get("peak_bytes"), r.get("planned_bytes")
        ratio = peak / planned if ok and peak and planned else None
        lines.append(
            f"| {r['backbone']} | {r['method']} | {'yes' if r['compiled'] else 'no'} "
            f"| {_fmt(step_s and 1e3 * step_s, '.1f')} "
            f"| {_fmt(r.get('first_step_s') if ok else None, '.1f')} "
            f"| {_fmt(r.get('samples_per_s') if ok else None, '.2f')} "
            f"| {_fmt(flops and flops / 1e12, '.3g')} | {_fmt(mfu, '.1f')} "
            f"| {_fmt(peak and peak / 2**30 if ok else None, '.2f')} "
            f"| {_fmt(planned and planned / 2**30, '.2f')} | {_fmt(ratio, '.2f')} "
            f"| {r['status']} |"
        )
    return "\n".join(lines)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        import torch._dynamo as dynamo

        dynamo.reset()  # compiled graphs of the last configuration hold memory
    except Exception as e:  # noqa: BLE001  (dynamo may be missing on exotic builds)
        print(f"torch._dynamo.reset() failed: {e}", file=sys.stderr)


def _reason(e: BaseException) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
        return "failed: out of memory"
    text = " ".join(str(e).split())[:120]
    return f"failed: {type(e).__name__}: {text}".replace("|", "/")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--backbones", nargs="+", default=["small", "1.3b"])
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="default: full lora weatherpeft weatherpeft+lean sfas sfas+lean sfas+lean+r10 (--quick: without sfas); +lean / +r<N> as in bench_methods.py",
    )
    p.add_argument(
        "--grid", default=None, help="HxW, e.g. 128x256 (default on CUDA) or 721x1440; 32x64 on CPU"
    )
    p.add_argument("--batch", type=int, default=1, help="samples per step")
    p.add_argument(
        "--levels",
        type=int,
        default=None,
        help="pressure levels, <= 13 (default 13 on CUDA, 3 on CPU)",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10, quick 5)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps (default 3, quick 2, CPU 1)"
    )
    p.add_argument(
        "--compile",
        choices=("off", "on", "both"),
        default=None,
        help="torch.compile the Swin blocks (default: both on CUDA, off on CPU)",
    )
    p.add_argument(
        "--compile-methods",
        nargs="+",
        default=None,
        help="methods that also run compiled (default: all; --quick: weatherpeft)",
    )
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer steps, methods and compiles")
    p.add_argument(
        "--config-timeout",
        type=float,
        default=150.0,
        help="seconds one configuration may take (0: no limit)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="start no configuration after this many seconds (default 300, quick 240)",
    )
    p.add_argument("--out", type=Path, default=None, help="markdown file (rows also as .json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    args.grid = parse_grid(args.grid or ("32x64" if cpu else "128x256"))
    if args.levels is None:
        args.levels = 3 if cpu else 13
    if args.methods is None:
        args.methods = ["full", "lora", "weatherpeft", "weatherpeft+lean"] + (
            [] if args.quick else ["sfas", "sfas+lean", "sfas+lean+r10"]
        )
    if args.steps is None:
        args.steps = 5 if args.quick else 10
    if args.warmup is None:
        args.warmup = 1 if cpu else 2 if args.quick else 3
    if args.compile is None:
        args.compile = "both" if device.type == "cuda" else "off"
    if args.compile_methods is None:
        args.compile_methods = ["weatherpeft"] if args.quick else list(args.methods)
    if args.time_budget is None:
        args.time_budget = 240.0 if args.quick else 300.0
    if not 1 <= args.levels <= len(LEVELS):
        p.error(f"--levels must be in [1, {len(LEVELS)}]")
    return args


def main(argv: Sequence[str] | None = None, *, log: Callable[[str], None] | None = None) -> int:
    args = parse_args(argv)
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    device = torch.device(args.device)
    started = time.perf_counter()
    plans: list[tuple[str, str, bool]] = []
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    for compiled in modes:  # every eager row before any compiled one
        for backbone in args.backbones:
            for method in args.methods:
                if compiled and method not in args.compile_methods:
                    continue
                plans.append((backbone, method, compiled))
    rows = []
    for backbone, method, compiled in plans:
        row: dict[str, Any] = {
            "backbone": backbone,
            "method": method,
            "compiled": compiled,
            "device": device.type,
            "grid": list(args.grid),
            "batch": args.batch,
        }
        elapsed = time.perf_counter() - started
        if elapsed > args.time_budget:
            row["status"] = f"skipped: time budget ({args.time_budget:.0f} s) spent"
        else:
            limit = args.config_timeout
            if limit > 0:  # never run past the budget by more than one limit
                limit = min(limit, max(30.0, args.time_budget + 60 - elapsed))
            t0 = time.perf_counter()
            try:
                with time_limit(limit):
                    row.update(
                        measure(
                            backbone,
                            method,
                            compiled=compiled,
                            device=device,
                            grid=args.grid,
                            batch_size=args.batch,
                            levels=args.levels,
                            steps=args.steps,
                            warmup=args.warmup,
                            checkpointing=args.checkpointing,
                            precision=args.precision,
                        )
                    )
                row["status"] = "ok"
            except Exception as e:  # noqa: BLE001  (OOM, compile error, timeout: record, go on)
                row["status"] = _reason(e)
                traceback.print_exc(limit=3, file=sys.stderr)
            row["seconds"] = time.perf_counter() - t0
            _free(device)
        row["planned_bytes"] = planned_peak(
            backbone,
            method,
            args.grid,
            args.batch,
            args.levels,
            args.precision,
            args.checkpointing,
        )
        rows.append(row)
        log(
            f"{backbone} {method} compile={compiled}: {row['status']} "
            f"({time.perf_counter() - started:.0f} s elapsed)"
        )

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    header = (
        f"Device {device.type} ({gpu or platform.machine()}), torch {torch.__version__}, "
        f"{args.precision} (Aurora's backbone autocast), grid {args.grid[0]}x{args.grid[1]}, "
        f"{args.levels} levels, batch {args.batch}, activation checkpointing "
        f"{'on' if args.checkpointing else 'off'}; step = forward + backward + method hook + "
        f"optimiser, median of {args.steps} after {args.warmup} warm-up steps. MFU against "
        f"{PEAK_FLOPS / 1e12:.0f} TFLOP/s (dense bf16, H100/H200), FLOPs of one eager step"
        + (
            " (with checkpointing: executed FLOPs, recomputation included)"
            if args.checkpointing
            else ""
        )
        + ". Planned = wpeft.distributed.plan's one-GPU peak."
    )
    write_report(table(rows, header), rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
