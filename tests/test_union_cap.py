"""``union_cap``: the union of SFAS's changing masks stays within a fraction of the backbone.

The policy (:func:`wpeft.methods.fisher.capped_topk_masks`) is checked against a brute-force
reference on small synthetic tensors with hand-made scores (ties included), bucketed and over
2 gloo ranks' shards; the method on the tiny backbone (frozen entries, refusals) and through
the training loop (a resumed run keeps the cap).
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from killing import train_killed_during_step
from safetensors.torch import load_file
from test_backbone import random_batch
from test_sfas import SHARD_SHAPES, _chunk_spans, changed_sets, loss_of, pretrained_like
from test_training import config as train_config
from test_training import small_cache  # noqa: F401  (autouse: a small world cache)

from wpeft.backbones.aurora_adapter import build_backbone
from wpeft.errors import ConfigError
from wpeft.methods import create_method
from wpeft.methods.fisher import _candidates, capped_topk_masks, topk_masks
from wpeft.methods.sfas import SFAS, ChildTuningD, EntrySelection, FishMask, SFASConfig
from wpeft.methods.shards import Collective
from wpeft.methods.weatherpeft import WeatherPEFTConfig
from wpeft.training.loop import train

SHAPES = [(5, 7), (13,), (3, 4, 2), (1,)]  # 73 entries
TOTAL = 73


def flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def top_of(scores: torch.Tensor, allowed: torch.Tensor, n: int) -> torch.Tensor:
    """Flat mask of the n largest allowed scores, ties in flat order (stable sort)."""
    idx = allowed.nonzero().squeeze(1)
    order = torch.sort(scores[idx], descending=True, stable=True).indices
    out = torch.zeros_like(allowed)
    out[idx[order[:n]]] = True
    return out


def reference(scores: torch.Tensor, union: torch.Tensor, k: int, cap: int) -> torch.Tensor:
    """The policy written out on one flat tensor: room = cap − |union|; if room < k, only the
    best ``room`` outside the union may enter; then the top-k."""
    room = cap - int(union.sum())
    if room >= k:
        return top_of(scores, torch.ones_like(union), k)
    allowed = union | top_of(scores, ~union, room)
    return top_of(scores, allowed, k)


def selection(k: int, cap: int | None, chunk_numel: int = 16) -> EntrySelection:
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    return EntrySelection(list(zip("abcd", params)), k, chunk_numel=chunk_numel, cap=cap)


def refresh(sel: EntrySelection, step: int, seed: int = 0, levels: int = 6) -> None:
    """Hand-made scores (few distinct values: ties at the threshold) become the next mask."""
    g = torch.Generator().manual_seed(1000 * seed + step)
    buckets = sel.layout.zeros(torch.float32, "cpu")
    for view in sel.layout.split(buckets):
        view.copy_(torch.randint(0, levels, view.shape, generator=g).float())
    sel.select(buckets, step=step)


# --- the policy on hand-made scores -------------------------------------------------------------


@pytest.mark.parametrize("compact", [0.0, 1.0])
def test_allowed_topk_matches_brute_force_with_ties_at_zero(compact: float) -> None:
    g = torch.Generator().manual_seed(0)
    for k in (1, 5, 17, 30):
        scores = [torch.randint(0, 3, s, generator=g).float() for s in SHAPES]  # many zeros
        allowed = [torch.rand(s, generator=g) < 0.5 for s in SHAPES]
        if int(flat(allowed).sum()) < k:
            continue
        masks = topk_masks(scores, k, chunk_numel=5, compact_fraction=compact, allowed=allowed)
        assert torch.equal(flat(masks), top_of(flat(scores), flat(allowed), k)), k
        assert not bool((flat(masks) & ~flat(allowed)).any())
    with pytest.raises(ValueError, match="allowed"):
        topk_masks(scores, TOTAL, allowed=allowed)
    # the compaction gathers allowed entries only (a few, when a capped union is full)
    gathered = _candidates(scores, 0, 1 << 31, 5, allowed)
    assert sum(c.numel() for c in gathered) == int(flat(allowed).sum())


def test_union_stays_within_cap_and_every_mask_has_k_entries() -> None:
    k, cap = 5, 12
    sel = selection(k, cap, chunk_numel=10)  # several buckets, a tensor alone in its own
    unions = []
    for step in range(30):
        before = None if sel.union_masks is None else flat(sel.union_masks).clone()
        refresh(sel, step)
        mask, union = flat(sel.masks), flat(sel.union_masks)
        assert int(mask.sum()) == k
        assert int(union.sum()) <= cap and sel.union_size() == int(union.sum())
        assert not bool((mask & ~union).any())
        if before is not None:  # the union only grows
            assert not bool((before & ~union).any())
        unions.append(int(union.sum()))
    assert unions[-1] == cap and unions[0] == k  # it filled up, then stayed full
    assert sel.log[-1]["union"] == cap


def test_capped_selection_equals_the_policy_written_out() -> None:
    """Every refresh equals the brute-force reference, ties taken in flat order."""
    for k, cap, chunk in ((5, 12, 16), (7, 8, 3), (10, 40, 100)):
        sel = selection(k, cap, chunk_numel=chunk)
        union = torch.zeros(TOTAL, dtype=torch.bool)
        for step in range(15):
            g = torch.Generator().manual_seed(step)
            scores = torch.randint(0, 5, (TOTAL,), generator=g).float()
            expected = reference(scores, union, k, cap)
            buckets = sel.layout.zeros(torch.float32, "cpu")
            for view, s in zip(sel.layout.split(buckets),
                               torch.split(scores, [torch.Size(s).numel() for s in SHAPES])):
                view.copy_(s.view(view.shape))
            sel.select(buckets, step=step)
            assert torch.equal(flat(sel.masks), expected), (k, cap, step)
            union |= expected
            assert torch.equal(flat(sel.union_masks), union)


def test_cap_equal_to_k_keeps_the_first_mask() -> None:
    sel = selection(6, 6)
    refresh(sel, 0)
    first = flat(sel.masks).clone()
    for step in range(1, 10):
        refresh(sel, step)
        assert torch.equal(flat(sel.masks), first)
    assert sel.union_size() == 6 and all(r["new_entries"] == 0 for r in sel.log[1:])


def test_cap_of_everything_equals_no_cap_bitwise() -> None:
    """cap = all entries never binds, even once room < k (the capped path runs): the masks equal
    the uncapped ones at every refresh."""
    capped, free = selection(20, TOTAL, chunk_numel=7), selection(20, None, chunk_numel=7)
    rooms = []
    for step in range(12):
        rooms.append(TOTAL - capped.union_size())
        refresh(capped, step)
        refresh(free, step)
        assert all(torch.equal(a, b) for a, b in zip(capped.masks, free.masks)), step
    assert min(rooms) < 20  # the allowed-mask path was taken


def test_capped_topk_refuses_a_union_larger_than_the_cap() -> None:
    scores = [torch.rand(10)]
    union = [torch.arange(10) < 6]
    with pytest.raises(ValueError, match=r"\|union\|=6"):
        capped_topk_masks(scores, 2, union, cap=5)
    sel = selection(3, 4)
    sel.load_state_dict({"masks": [b.clone() for b in sel.layout.zeros(torch.bool, "cpu")],
                         "union": [b.fill_(True) for b in sel.layout.zeros(torch.bool, "cpu")]})
    with pytest.raises(ConfigError, match=r"union cap of 4 entries.*\|union\|=73"):
        refresh(sel, 0)


# --- the method ---------------------------------------------------------------------------------


def test_sfas_frozen_outside_the_capped_union() -> None:
    """Entries outside the union never change, and the union (and the change) stays in the cap
    while the uncapped run outgrows it."""
    batch = random_batch(build_backbone("tiny").config, B=1, H=16, W=32)
    results = {}
    for cap in (None, 0.003):
        model = pretrained_like()
        reference_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        method = SFAS(keep_ratio=0.002, union_cap=cap, seed=1)
        method.apply(model)
        opt = method.optimizer(lr=1e-3, weight_decay=0.01)
        for step in range(3):
            opt.zero_grad(set_to_none=True)
            loss_of(model, batch).backward()
            method.after_backward(step, 3)
            opt.step()
        sel = method.selection
        changed = changed_sets(method, reference_state)
        assert all(not bool((c & ~u).any()) for c, u in zip(changed, sel.union_masks))
        results[cap] = (sel.union_size(), sum(int(c.sum()) for c in changed), sel)
    cap_count = results[0.003][2].cap
    assert cap_count == round(0.003 * results[0.003][2].total)
    assert results[0.003][0] == cap_count and results[0.003][1] <= cap_count
    assert results[None][0] > cap_count  # without the cap the union outgrows it


def test_bad_caps_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"union_cap=0\.001.*keep_ratio=0\.003"):
        SFASConfig(keep_ratio=0.003, union_cap=0.001)
    with pytest.raises(ConfigError, match=r"union_cap=1\.5"):
        SFASConfig(union_cap=1.5)
    with pytest.raises(ConfigError, match="union_cap=nan"):
        SFASConfig(union_cap=float("nan"))
    with pytest.raises(ConfigError, match=r"union_cap=0\.01.*keep_ratio=0\.04"):
        WeatherPEFTConfig(keep_ratio=0.04, union_cap=0.01)
    assert SFASConfig(keep_ratio=0.01, union_cap=0.01).union_cap == 0.01
    assert create_method("weatherpeft", union_cap=0.5).config.union_cap == 0.5
    for cls in (FishMask, ChildTuningD):  # a fixed mask is its own union
        with pytest.raises(ConfigError, match="fixed mask.*union_cap=0.01"):
            cls(union_cap=0.01)
    with pytest.raises(ConfigError, match=r"union_cap"):
        train_config(method="fish", method_options={"union_cap": 0.01})
    with pytest.raises(ConfigError, match="union cap"):
        selection(5, 4)


# --- a resumed run ------------------------------------------------------------------------------


def test_resumed_run_keeps_the_cap(tmp_path, monkeypatch) -> None:
    """Killed after its step-2 checkpoint and resumed, a capped SFAS run ends as the
    uninterrupted one, its union at the cap."""
    cfg = train_config(method="sfas", method_options={"keep_ratio": 0.002, "union_cap": 0.003},
                       steps=4, checkpoint_every=2)
    unions: list[tuple[int, int | None]] = []

    def union_of(method, env, opt) -> None:
        unions.append((method.selection.union_size(), method.selection.cap))

    full = train(cfg, tmp_path / "full", progress=False, on_trained=union_of)
    train_killed_during_step(monkeypatch, cfg, tmp_path / "killed", 3)  # after the step-2 checkpoint
    resumed = train(cfg, tmp_path / "killed", resume=True, progress=False, on_trained=union_of)
    a = load_file(str(tmp_path / "full" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["changed"] == full["changed"]
    (u_full, cap), (u_resumed, _) = unions
    assert u_full == u_resumed == cap  # the cap binds, and binds after the resume as well
    assert full["changed"]["backbone"] <= cap


# --- FSDP2 shards (2 gloo ranks) ----------------------------------------------------------------


def _capped_shard_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        coll = Collective.of_process_group("cpu")
        spans = _chunk_spans(world, rank)
        g = torch.Generator().manual_seed(0)  # the same full tensors on every rank
        out = []
        for k, cap in ((3, 9), (9, 9), (20, 30)):
            union = [torch.zeros(s, dtype=torch.bool) for s in SHARD_SHAPES]
            for _ in range(4):
                full = [torch.randint(0, 4, s, generator=g).float() for s in SHARD_SHAPES]
                mine = [sp.narrow(f).clone() for sp, f in zip(spans, full)]
                my_union = [sp.narrow(u).clone() for sp, u in zip(spans, union)]
                masks = capped_topk_masks(mine, k, my_union, cap, chunk_numel=3, collective=coll)
                gathered = coll.gather_full(masks, spans)
                out.append((k, cap, full, [u.clone() for u in union], gathered))
                union = [u | m for u, m in zip(union, gathered)]
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_capped_selection_equals_the_unsharded_one() -> None:
    """Over 2 ranks' dim-0 shards (uneven, empty) the capped top-k is the one-process one."""
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_capped_shard_worker, args=(world, os.path.join(tmp, "init"), tmp), nprocs=world)
        results = [torch.load(f"{tmp}/rank{r}.pt", weights_only=False) for r in range(world)]
    bound = 0
    for r in results:
        for k, cap, full, union, gathered in r:
            expected = capped_topk_masks(full, k, union, cap, chunk_numel=3)
            assert all(torch.equal(a, b) for a, b in zip(gathered, expected)), (k, cap)
            assert int(flat(gathered).sum()) == k
            grown = flat(union) | flat(gathered)
            assert int(grown.sum()) <= cap
            bound += int(cap - int(flat(union).sum()) < k)
    assert bound > 0  # the cap bound at some refresh
