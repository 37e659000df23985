"""Where a lean SFAS refresh spends its time: milliseconds per refresh in each part of it.

Trains SFAS (or WeatherPEFT) with ``lean=True`` and a fresh mask every step on one random batch,
as ``bench_methods.py`` does, and times the parts of :class:`~wpeft.methods.streaming.StreamingTopK`
and :class:`~wpeft.methods.lean.LeanSelection` with a timer wrapped around each (the wrappers
cost about a microsecond per call). Parts nest: ``add`` (one call per tensor, inside backward)
includes ``_block_ends`` and ``_found`` (the entries of a large tensor reaching the threshold);
``_flush`` (when a million entries wait, and in ``finish``) scores what waits: ``_flush_small``
(the small tensors), ``_flush_found`` (the large tensors' Z and found entries, with
``_held_to_draws``); ``finish`` also includes ``_top_m`` and ``_kth_largest``; ``begin``
includes ``draw_all`` (the large draws Z); ``_append`` takes whole tensors (when nothing can
be dropped, or NaN/inf). ``set_indices`` (the union's update) runs after the refresh and is not part of its time.

    python benchmarks/bench_refresh.py --backbone tiny --batch 2
    python benchmarks/bench_refresh.py --backbone small --batch 1
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from collections.abc import Callable
from typing import Any

PARTS = {
    "wpeft.methods.streaming:StreamingTopK": (
        "begin", "add", "finish", "_found", "_flush", "_flush_small", "_flush_found",
        "_held_to_draws", "_append", "_prune",
    ),
    "wpeft.methods.streaming": ("_block_ends", "_top_m", "_kth_largest"),
    "wpeft.methods.noise:TensorNoise": ("draw_all",),
    "wpeft.methods.lean:LeanSelection": ("set_indices",),
}


def instrument(totals: dict[str, float], calls: collections.Counter) -> None:
    """Wrap every part in ``PARTS`` with a timer adding to ``totals`` and ``calls``."""
    import importlib

    for where, names in PARTS.items():
        module_name, _, cls_name = where.partition(":")
        owner: Any = importlib.import_module(module_name)
        if cls_name:
            owner = getattr(owner, cls_name)
        for name in names:
            inner = owner.__dict__[name]
            is_class_method = isinstance(inner, classmethod)
            func: Callable[..., Any] = inner.__func__ if is_class_method else inner

            def timed(*args: Any, _func: Callable[..., Any] = func, _name: str = name,
                      **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return _func(*args, **kwargs)
                finally:
                    totals[_name] += time.perf_counter() - start
                    calls[_name] += 1

            setattr(owner, name, classmethod(timed) if is_class_method else timed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--grid", type=int, nargs=2, default=[32, 64], metavar=("H", "W"))
    p.add_argument("--method", default="sfas", choices=("sfas", "weatherpeft"))
    p.add_argument("--steps", type=int, default=20, help="timed refreshes (after 3 warm-up ones)")
    p.add_argument("--horizon", type=int, default=1000)
    args = p.parse_args()

    totals: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    instrument(totals, calls)

    import torch

    from wpeft.backbones.aurora_adapter import build_backbone
    from wpeft.data.batch import random_batch
    from wpeft.methods import create_method

    torch.manual_seed(0)
    model = build_backbone(args.backbone)
    with torch.no_grad():  # as bench_methods: leave Aurora's identity initialisation
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    cfg = model.config
    batch = random_batch(cfg.surf_vars, cfg.static_vars, cfg.atmos_vars, batch_size=args.batch,
                         grid=tuple(args.grid))
    method = create_method(args.method, lean=True)
    method.apply(model)
    opt = method.optimizer(lr=1e-4, weight_decay=0.01)
    sel = method.selection

    refreshes = []
    for step in range(3 + args.steps):
        if step == 3:
            totals.clear()
            calls.clear()
        opt.zero_grad(set_to_none=True)
        method.before_backward(step, args.horizon)
        pred = model(batch)
        sum(v.pow(2).mean() for v in pred.surf_vars.values()).backward()
        method.after_backward(step, args.horizon)
        opt.step()
        if step >= 3:
            refreshes.append(sel.refresh_seconds)

    n = args.steps
    print(f"{args.method} lean on `{args.backbone}` (batch {args.batch} x {args.grid[0]} x "
          f"{args.grid[1]}), {n} refreshes: "
          f"median {1e3 * statistics.median(refreshes):.1f} ms, "
          f"min {1e3 * min(refreshes):.1f} ms; {sel.exact_refreshes} proven exact of "
          f"{sel.refreshes}; {len(sel.shapes)} tensors, "
          f"{sum(s.numel() for s in sel.shapes):,} entries")
    print()
    print("| part | ms per refresh | calls per refresh |")
    print("|---|---|---|")
    for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| `{name}` | {1e3 * seconds / n:.1f} | {calls[name] / n:.0f} |")


if __name__ == "__main__":
    main()
