"""Cost of every fine-tuning method on one backbone and one batch shape, in one run.

For each method (each in its own subprocess, so peak memory is its own): median training-step
time (forward + backward + method hooks + optimiser step), peak memory (CPU max RSS, or CUDA max
allocated on a GPU), optimiser-state bytes, the method's own selection state
(``method.state_bytes()``: masks, union, importance buffer), mask-refresh time, and adapter-file
bytes. Prints a table with ratios against Full-Tuning and LoRA, and writes it as markdown with
``--out``.

A method may carry settings after ``+``: ``sfas+lean`` is SFAS with ``lean=True``,
``sfas+lean+r10`` also refreshes its mask every 10 steps (``refresh_every=10``; its median step
is then a step between refreshes); ``child_tuning_d+lean`` also sets ``dense_update=False``.

Refresh time: the dense selection's ``after_backward`` (importance, noise, exact top-k); the lean
one's draws of the large noise values Z at ``before_backward``, its scoring inside the gradient
hooks during backward and its ``after_backward`` (``LeanSelection.refresh_seconds``), over
refresh steps only. The JSON rows also hold ``phases_s``: the median seconds of a step's
forward, backward (the lean gradient hooks included), ``after_backward`` and optimiser step.

    python benchmarks/bench_methods.py --backbone tiny --batch 2 --steps 12 --out benchmarks/results/methods-cpu-tiny.md
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import write_report


def method_spec(spec: str) -> tuple[str, dict]:
    """``"sfas+lean+r10"`` -> ``("sfas", {"lean": True, "refresh_every": 10})``."""
    name, *flags = spec.split("+")
    kwargs: dict = {}
    for flag in flags:
        if flag == "lean":
            kwargs["lean"] = True
        elif flag.startswith("r") and flag[1:].isdigit():
            kwargs["refresh_every"] = int(flag[1:])
        else:
            raise SystemExit(f"Unknown setting {flag!r} in {spec!r}: use +lean or +r<steps>.")
    if name == "child_tuning_d" and kwargs.get("lean"):
        kwargs["dense_update"] = False  # lean updates only the selected entries
    return name, kwargs


def measure(
    spec: str, backbone: str, batch_size: int, steps: int, device: str, horizon: int,
    grid: tuple[int, int] = (32, 64),
) -> dict:
    import torch

    from wpeft.backbones.aurora_adapter import build_backbone
    from wpeft.methods import create_method
    from wpeft.methods.adapter_file import save_adapter

    from wpeft.data.batch import random_batch

    torch.manual_seed(0)
    model = build_backbone(backbone).to(device)
    with torch.no_grad():  # leave Aurora's identity initialisation so every block matters
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = model.config
    batch = random_batch(
        cfg.surf_vars, cfg.static_vars, cfg.atmos_vars, batch_size=batch_size, grid=grid
    ).to(device)
    name, kwargs = method_spec(spec)
    method = create_method(name, **kwargs)
    method.apply(model)
    method.added.to(device)

    def loss_fn() -> torch.Tensor:
        pred = model(batch)
        return sum(v.pow(2).mean() for v in pred.surf_vars.values())

    if method.preparation(1, 1) is not None:  # static masks select before training
        method.prepare(loss_fn, n_batches=1)
    opt = method.optimizer(lr=1e-4, weight_decay=0.01)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sel = method.selection
    lean = sel is not None and sel.lean
    refresh_every = getattr(method.config, "refresh_every", 1)
    step_times, refresh_times, phases = [], [], []
    for step in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        method.before_backward(step, horizon)
        loss = loss_fn()
        if device == "cuda":
            torch.cuda.synchronize()
        tf = time.perf_counter()
        loss.backward()
        t1 = time.perf_counter()
        method.after_backward(step, horizon)
        if device == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        t3 = time.perf_counter()
        step_times.append(t3 - t0)
        phases.append((tf - t0, t1 - tf, t2 - t1, t3 - t2))
        if step >= 2 and step % refresh_every == 0:
            refresh_times.append(sel.refresh_seconds if lean else t2 - t1)
    warm = slice(2, None)  # first steps pay one-off allocation costs
    state_bytes = sum(
        t.numel() * t.element_size()
        for s in opt.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = save_adapter(method, reference, Path(tmp) / name)
        adapter_bytes = path.stat().st_size + path.with_suffix(".json").stat().st_size
    peak = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "method": spec,
        "step_s": statistics.median(step_times[warm]),
        "hook_s": statistics.median(refresh_times) if refresh_times else 0.0,
        # median seconds of each part of a step (the backward includes the lean hooks)
        "phases_s": {
            name: statistics.median(p[i] for p in phases[warm])
            for i, name in enumerate(("forward", "backward", "after_backward", "optimizer"))
        },
        "selection_state_bytes": method.state_bytes(),
        "peak_bytes": peak,
        "optimizer_state_bytes": state_bytes,
        "adapter_bytes": adapter_bytes,
        "trainable": method.trainable()["total"],
        "budget_fraction": method.budget_fraction(),
        # refreshes proven equal to the dense top-k (lean) out of all refreshes
        "exact": f"{sel.exact_refreshes}/{-(-steps // refresh_every)}" if lean and sel.stream
        else "-",
    }


def median_row(rounds: list[dict]) -> dict:
    """One method's rounds as one row: the median of each timing and peak, the rest from the
    first round (sizes do not vary)."""
    row = dict(rounds[0])
    for key in ("step_s", "hook_s", "peak_bytes"):
        row[key] = statistics.median(r[key] for r in rounds)
    row["phases_s"] = {
        name: statistics.median(r["phases_s"][name] for r in rounds) for name in row["phases_s"]
    }
    row["rounds"] = len(rounds)
    return row


def table(rows: list[dict], header: str) -> str:
    by = {r["method"]: r for r in rows}
    full, lora = by.get("full"), by.get("lora")
    lines = [
        header,
        "",
        "| method | budget % | step (ms) | step / full | step / lora | refresh (ms) "
        "| refresh / step | peak (MB) | peak / full | peak / lora | optim. + sel. state (MB) "
        "| state / full | adapter (MB) | adapter / full | exact refreshes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        r["state_bytes"] = r["optimizer_state_bytes"] + r.get("selection_state_bytes", 0)

    def ratio(a: float, b: dict | None, key: str) -> str:
        return f"{a / b[key]:.2f}" if b and b[key] else "-"

    for r in rows:
        share = f"{r['hook_s'] / r['step_s']:.2f}" if r["hook_s"] else "-"
        lines.append(
            f"| {r['method']} | {100 * r['budget_fraction']:.3f} | {1e3 * r['step_s']:.1f} "
            f"| {ratio(r['step_s'], full, 'step_s')} | {ratio(r['step_s'], lora, 'step_s')} "
            f"| {1e3 * r['hook_s']:.1f} | {share} | {r['peak_bytes'] / 2**20:.0f} "
            f"| {ratio(r['peak_bytes'], full, 'peak_bytes')} "
            f"| {ratio(r['peak_bytes'], lora, 'peak_bytes')} "
            f"| {r['state_bytes'] / 2**20:.2f} "
            f"| {ratio(r['state_bytes'], full, 'state_bytes')} "
            f"| {r['adapter_bytes'] / 2**20:.3f} | {ratio(r['adapter_bytes'], full, 'adapter_bytes')} "
            f"| {r.get('exact', '-')} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--grid", type=int, nargs=2, default=[32, 64], metavar=("H", "W"),
                   help="latitude x longitude points of the batch (the step grows with them, "
                        "a mask refresh does not)")
    p.add_argument("--horizon", type=int, default=1000,
                   help="annealing horizon t_s the steps belong to (SFAS's noise factor "
                        "γ(1 − n_s/t_s)): the timed steps are the first of a run this long")
    p.add_argument("--device", default="cuda" if "--cuda" in sys.argv else "cpu")
    p.add_argument("--methods", nargs="*", default=None)
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds over the methods, round-robin; each timing is the median of "
                        "its rounds (steps on a shared CPU vary by ±30 %% between runs)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(
            measure(args.one, args.backbone, args.batch, args.steps, args.device, args.horizon,
                    tuple(args.grid))
        ))
        return

    from wpeft.methods import METHODS

    names = args.methods or sorted(METHODS)
    rounds: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.repeat):  # round-robin: a slow spell of the machine hits every method
        for name in names:
            out = subprocess.run(
                [sys.executable, __file__, "--one", name, "--backbone", args.backbone,
                 "--batch", str(args.batch), "--steps", str(args.steps), "--device",
                 args.device, "--horizon", str(args.horizon), "--grid", *map(str, args.grid)],
                capture_output=True, text=True, check=True,
            )
            rounds[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"measured {name} (round {r + 1} of {args.repeat})", file=sys.stderr)
    rows = [median_row(rs) for rs in rounds.values()]
    import torch

    header = (
        f"Backbone `{args.backbone}`, batch {args.batch} x {args.grid[0]} x {args.grid[1]} grid "
        "(2 history steps, 3 levels), "
        f"the first {args.steps} steps of a {args.horizon}-step run (median of the last "
        f"{args.steps - 2}; median of {args.repeat} round-robin rounds), device {args.device} "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads). Peak = max RSS of the method's own process."
    )
    write_report(table(rows, header), rows, args.out)


if __name__ == "__main__":
    main()
