"""SFAS and the static Fisher masks: exact top-k, annealed noise, sparse-safe AdamW, DDP agreement.

The selection machinery (``wpeft.methods.fisher``) is checked on small synthetic tensors against
brute-force references; the methods (``wpeft.methods.sfas``) on the tiny Aurora backbone, whose
parameters are perturbed first so gradients reach every block (random init makes them identity).
"""

from __future__ import annotations

import functools
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_backbone import random_batch

from wpeft.backbones.aurora_adapter import WpeftAurora, build_backbone
from wpeft.errors import ConfigError
from wpeft.methods.fisher import (
    FlatLayout,
    ImportanceAccumulator,
    MaskedAdamW,
    anneal_factor,
    broadcast_mask,
    count_at_least,
    normalise_by_global_max_,
    perturb_,
    search_threshold,
    topk_masks,
)
from wpeft.methods.noise import TensorNoise, exceedance_fraction
from wpeft.methods.sfas import (
    SFAS,
    ChildTuningD,
    ChildTuningDConfig,
    FishMask,
    FishMaskConfig,
    MaskRecorder,
    SFASConfig,
)
from wpeft.methods.shards import Collective, Span, span_of

# --- helpers ------------------------------------------------------------------------------------


def pretrained_like(seed: int = 0) -> WpeftAurora:
    """Tiny backbone with non-identity blocks (random init zeroes the res-post-norms)."""
    model = build_backbone("tiny", seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def loss_of(model: WpeftAurora, batch) -> torch.Tensor:
    pred = model(batch)
    return sum(v.pow(2).mean() for v in pred.surf_vars.values())


@pytest.fixture(scope="module")
def batch():
    return random_batch(build_backbone("tiny").config, B=1, H=16, W=32)


def brute_topk(scores: list[torch.Tensor], k: int) -> set[int]:
    """Global flat indices of the k largest, ties by flat order (stable sort)."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    order = torch.sort(flat, descending=True, stable=True).indices
    return set(order[:k].tolist())


def flat_set(masks: list[torch.Tensor]) -> set[int]:
    return set(torch.cat([m.reshape(-1) for m in masks]).nonzero().squeeze(1).tolist())


def fisher_scores(method) -> list[torch.Tensor]:
    """Plain g² of the eligible tensors (the pure-Fisher reference)."""
    return [p.grad.detach().float().square() for p in method.selection.params]


def changed_sets(method, reference) -> list[torch.Tensor]:
    sel = method.selection
    return [
        p.detach() != reference[n.removeprefix("model.")] for n, p in zip(sel.names, sel.params)
    ]


def run_steps(method, model, batch, steps, *, lr=1e-3, weight_decay=0.01, total=None):
    opt = method.optimizer(lr=lr, weight_decay=weight_decay)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_of(model, batch).backward()
        method.after_backward(step, total or steps)
        opt.step()
    return opt


# --- top-k --------------------------------------------------------------------------------------


@pytest.mark.parametrize("compact", [0.0, 1 / 32, 1.0])
def test_topk_exact_k_with_ties_matches_brute_force(compact: float) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (0,), (13,), (3, 4, 2), (1,)]
    for k in (0, 1, 7, 20, 40, 72, 73):
        # few distinct values: many ties at the threshold
        scores = [torch.randint(0, 6, s, generator=g).float() for s in shapes]
        masks = topk_masks(scores, k, compact_fraction=compact)
        assert sum(int(m.sum()) for m in masks) == k
        assert [m.shape for m in masks] == [s.shape for s in scores]
        assert flat_set(masks) == brute_topk(scores, k)
        # chunked (tiny chunks cross tensor and tie boundaries) gives the identical masks
        for chunk in (1, 3, 7):
            chunked = topk_masks(scores, k, chunk, compact_fraction=compact)
            assert all(torch.equal(a, b) for a, b in zip(chunked, masks))


@pytest.mark.parametrize("compact", [0.0, 1 / 32, 1.0])
def test_topk_equals_torch_topk_on_distinct_scores(compact: float) -> None:
    g = torch.Generator().manual_seed(1)
    scores = [torch.rand(s, generator=g) * 10.0 ** torch.randint(-30, 30, (1,), generator=g).item()
              for s in [(640, 3), (1000,), (2, 2, 9)]]
    flat = torch.cat([s.reshape(-1) for s in scores])
    for k in (1, 17, 250, 2000, flat.numel()):
        expected = set(torch.topk(flat, k).indices.tolist())
        for chunk in (16, 1 << 20):
            masks = topk_masks(scores, k, chunk_numel=chunk, compact_fraction=compact)
            assert flat_set(masks) == expected


def test_topk_zero_denormal_and_negative_zero() -> None:
    scores = [torch.tensor([0.0, -0.0, 1e-45, 0.0, 3.0, float("inf")])]
    assert flat_set(topk_masks(scores, 2)) == {4, 5}
    assert flat_set(topk_masks(scores, 3)) == {2, 4, 5}
    assert flat_set(topk_masks(scores, 4)) == {0, 2, 4, 5}  # -0.0 and 0.0 tie, flat order
    assert flat_set(topk_masks(scores, 5)) == {0, 1, 2, 4, 5}
    with pytest.raises(ValueError, match="k must be in"):
        topk_masks(scores, 7)
    with pytest.raises(ValueError, match="float32"):
        topk_masks([torch.zeros(3, dtype=torch.float64)], 1)


def test_threshold_search_counts_past_int32() -> None:
    """The search and tie arithmetic run on Python ints (int64 counts from the kernels).

    2^31 real entries cannot be allocated in a unit test (and 31 counting passes over them take
    minutes on 2 CPU cores), so the count function is mocked: 2^33 entries whose bit patterns
    take each of the values [0, 2^20) exactly 2^13 times. The real kernels count with
    ``torch.count_nonzero`` (int64) per chunk, checked below with a tiny chunk size.
    """
    per_value, n_values = 1 << 13, 1 << 20
    total = per_value * n_values
    assert total > 2**32

    def count(t: int) -> int:
        return max(0, n_values - t) * per_value

    calls = []
    k = 2**32 + 5
    t, hi, _, above = search_threshold(lambda th: calls.append(th) or count(th), k)
    assert hi == t + 1
    assert count(t) >= k > count(t + 1) == above
    assert above < k <= above + per_value  # the ties at t complete exactly k
    assert len(calls) == 31
    # early stop once few entries are undecided (what topk_masks then gathers)
    lo, hi, lo_count, above = search_threshold(count, k, lo_count=total, stop_below=1 << 24)
    assert lo_count == count(lo) >= k > count(hi) == above
    assert lo_count - above <= 1 << 24 and hi - lo > 1

    # real counting, chunked, sums into a Python int
    scores = [torch.full((1000,), 2.0), torch.full((37,), 0.5)]
    bits = torch.tensor(1.0).view(torch.int32).item()
    n = count_at_least(scores, bits, chunk_numel=3)
    assert n == 1000 and isinstance(n, int)


def test_flat_layout_buckets_preserve_order() -> None:
    shapes = [(4, 5), (3,), (50,), (2, 2), (1,)]
    layout = FlatLayout.plan(shapes, bucket_numel=24)
    assert layout.bucket_numels == (23, 50, 5)  # 20+3 | 50 alone | 4+1
    buckets = layout.zeros(torch.float32, "cpu")
    views = layout.split(buckets)
    for i, v in enumerate(views):
        v.fill_(i)
    assert [tuple(v.shape) for v in views] == shapes
    expected = [torch.full((torch.Size(s).numel(),), float(i)) for i, s in enumerate(shapes)]
    assert torch.equal(torch.cat(buckets), torch.cat(expected))


def test_importance_accumulator_averages_and_clips() -> None:
    shapes = [(3, 2), (5,)]
    layout = FlatLayout.plan(shapes, bucket_numel=4)
    g1 = [torch.full(shapes[0], 2.0), None]
    g2 = [torch.full(shapes[0], -4.0), torch.full(shapes[1], 0.5)]
    acc = ImportanceAccumulator(layout, "cpu", "fisher")
    acc.add(g1), acc.add(g2)
    acc.mean_()
    assert torch.equal(acc.views[0], torch.full(shapes[0], 10.0))  # (4 + 16) / 2
    assert torch.equal(acc.views[1], torch.full(shapes[1], 0.125))  # (0 + 0.25) / 2
    acc = ImportanceAccumulator(layout, "cpu", "abs_grad")
    acc.add(g2)
    assert torch.equal(acc.mean_()[0][:6], torch.full((6,), 4.0))
    # Child-Tuning's per-tensor clipping: a gradient of norm 4·sqrt(6) is scaled to norm 1
    acc = ImportanceAccumulator(layout, "cpu", "fisher", clip_norm=1.0)
    acc.add(g2)
    torch.testing.assert_close(acc.mean_()[0][:6].sum(), torch.tensor(1.0))


# --- noise --------------------------------------------------------------------------------------


def test_annealing_factor_schedule() -> None:
    assert anneal_factor(0, 10, 0.2) == pytest.approx(0.18)
    assert anneal_factor(9, 10, 0.2) == 0.0
    assert anneal_factor(20, 10, 0.2) == 0.0


def test_multiplicative_ranks_noise_scaled_fisher() -> None:
    """Released code: F̂·γ(1−n/N)·U — the factor is a positive constant, the ranking is F̂·U."""
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(s, generator=g) for s in [(30,), (8, 8)]]

    def mask(step: int, total: int) -> list[torch.Tensor]:
        scores = [x.square() for x in grads]
        normalise_by_global_max_(scores)
        perturb_(
            scores, step=step, total_steps=total, gamma=0.2, kind="multiplicative", seed=5,
            k=20,
        )
        return topk_masks(scores, 20)

    fhat = [x.square() for x in grads]
    normalise_by_global_max_(fhat)
    c = exceedance_fraction(20, 94)
    u = [noise.span(0, f.numel()).view(f.shape) for f, noise in
         zip(fhat, TensorNoise.draw_all(5, 3, [f.numel() for f in fhat], c), strict=True)]
    expected = brute_topk([f * ui for f, ui in zip(fhat, u)], 20)
    assert flat_set(mask(3, 10)) == expected
    assert flat_set(mask(3, 1000)) == expected  # another annealing factor: same ranking
    assert flat_set(mask(3, 10)) != brute_topk(fhat, 20)  # not the pure Fisher ranking


# --- SFAS on the tiny backbone ------------------------------------------------------------------


def test_sfas_sparse_changed_set_equals_union_of_masks(batch) -> None:
    model = pretrained_like()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    method = SFAS(keep_ratio=0.002)
    method.apply(model)
    sel = method.selection
    assert method.trainable()["backbone"] == sel.k == round(0.002 * sel.total)
    recorder = MaskRecorder()
    sel.add_callback(recorder)
    run_steps(method, model, batch, steps=4, weight_decay=0.1)

    assert [s for s, _ in recorder.history] == [0, 1, 2, 3]
    for _, masks in recorder.history:  # exactly k per step
        assert sum(v.numel() for v in masks.values()) == sel.k
    assert method.trainable()["backbone"] == sel.k
    union = [torch.zeros(p.numel(), dtype=torch.bool) for p in sel.params]
    for _, masks in recorder.history:
        for u, name in zip(union, sel.names):
            u[masks[name]] = True
    assert all(torch.equal(u.view(m.shape), m) for u, m in zip(union, method.union_masks))
    # the masks moved (the union grows) and nothing outside them changed, decay included
    assert sel.union_size() > 2 * sel.k
    for c, u in zip(changed_sets(method, reference), method.union_masks):
        assert torch.equal(c, u)
    assert method.changed(reference)["backbone"] == sel.union_size()


def test_dense_update_reproduces_the_released_pitfall(batch) -> None:
    model = pretrained_like()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    method = SFAS(keep_ratio=0.002, dense_update=True)
    method.apply(model)
    run_steps(method, model, batch, steps=3, weight_decay=0.1)
    changed = method.changed(reference)["backbone"]
    assert changed > method.selection.union_size()
    assert changed > 0.9 * method.selection.total  # decoupled decay moves (nearly) everything


def test_per_step_updates_stay_inside_the_current_mask(batch) -> None:
    """Even without weight decay, dense AdamW moves entries of earlier masks (stale momentum);
    the sparse-safe update moves exactly the current mask's entries."""
    for dense in (False, True):
        model = pretrained_like()
        method = SFAS(keep_ratio=0.002, dense_update=dense)
        method.apply(model)
        opt = method.optimizer(lr=1e-3, weight_decay=0.0)
        outside = []
        for step in range(3):
            before = [p.detach().clone() for p in method.selection.params]
            opt.zero_grad()
            loss_of(model, batch).backward()
            method.after_backward(step, 3)
            opt.step()
            moved = [p.detach() != b for p, b in zip(method.selection.params, before)]
            outside.append(sum(int((m & ~mask).sum()) for m, mask in zip(moved, method.masks)))
        if dense:
            assert outside[0] == 0 and outside[2] > 0
        else:
            assert outside == [0, 0, 0]


def test_additive_noise_explores_early_and_is_pure_fisher_at_the_end(batch) -> None:
    model = pretrained_like()
    method = SFAS(keep_ratio=0.002, noise="additive", gamma=0.2)
    method.apply(model)
    total = 10
    for step in (0, total - 1):
        model.zero_grad()
        loss_of(model, batch).backward()
        pure = flat_set(topk_masks(fisher_scores(method), method.selection.k))
        method.after_backward(step, total)
        got = flat_set(method.masks)
        assert len(got) == method.selection.k
        if step == 0:
            assert len(got & pure) < 0.9 * len(pure)  # exploration: differs from pure Fisher
        else:
            assert got == pure  # noise factor 0 at the last step


def test_mask_does_not_depend_on_bucketing(batch) -> None:
    masks = []
    for chunk in (1 << 24, 5000):
        model = pretrained_like()
        method = SFAS(keep_ratio=0.002, chunk_numel=chunk)
        method.apply(model)
        loss_of(model, batch).backward()
        method.after_backward(1, 10)
        masks.append(method.mask_dict())
    assert len(method.selection.layout.bucket_numels) > 100  # really re-bucketed
    assert masks[0].keys() == masks[1].keys()
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])


def test_abs_grad_importance_and_refresh_interval(batch) -> None:
    model = pretrained_like()
    method = SFAS(keep_ratio=0.002, importance="abs_grad", noise="none", refresh_every=3,
                  accumulate_batches=2)
    method.apply(model)
    recorder = MaskRecorder()
    method.selection.add_callback(recorder)
    model.zero_grad()
    loss_of(model, batch).backward()
    pure = flat_set(topk_masks([p.grad.abs() for p in method.selection.params], method.selection.k))
    method.after_backward(0, 6)
    assert flat_set(method.masks) == pure
    opt = method.optimizer(lr=1e-3)
    opt.step()
    for step in range(1, 6):
        opt.zero_grad()
        loss_of(model, batch).backward()
        method.after_backward(step, 6)
        opt.step()
    assert [s for s, _ in recorder.history] == [0, 3]


def test_adapter_state_is_sparse_and_reloads(batch) -> None:
    model = pretrained_like()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    method = SFAS(keep_ratio=0.002)
    method.apply(model)
    run_steps(method, model, batch, steps=2)
    state = method.adapter_state(reference)
    assert all(k.endswith((".indices", ".values")) for k in state)
    stored = sum(v.numel() for k, v in state.items() if k.endswith(".values"))
    assert stored == method.selection.union_size()
    assert all(v.dtype == torch.int64 for k, v in state.items() if k.endswith(".indices"))
    fresh = pretrained_like()
    other = SFAS(keep_ratio=0.002)
    other.apply(fresh)
    other.load_adapter_state(state)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_optimizer_before_any_mask_fails_clearly(batch) -> None:
    model = pretrained_like()
    method = SFAS()
    method.apply(model)
    opt = method.optimizer(lr=1e-3)
    loss_of(model, batch).backward()
    with pytest.raises(RuntimeError, match="after_backward"):
        opt.step()


# --- MaskedAdamW --------------------------------------------------------------------------------


def test_masked_adamw_unmasked_matches_torch_adamw() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.nn.Parameter(torch.randn(6, 5, generator=g))
    b = torch.nn.Parameter(a.detach().clone())
    ours = MaskedAdamW([a], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(5):
        grad = torch.randn(6, 5, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step(), ref.step()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_masked_adamw_per_entry_bias_correction_and_frozen_outside() -> None:
    """Each entry evolves exactly like its own scalar AdamW run on the steps it was selected."""
    g = torch.Generator().manual_seed(4)
    n, steps, lr, wd = 12, 6, 1e-2, 0.1
    p = torch.nn.Parameter(torch.randn(n, generator=g))
    start = p.detach().clone()
    masks = [torch.rand(n, generator=g) < 0.5 for _ in range(steps)]
    masks[0][0], masks[-1][0] = False, True  # entry 0 first selected late
    masks = [m & (torch.arange(n) != 1) for m in masks]  # entry 1 never selected
    grads = [torch.randn(n, generator=g) for _ in range(steps)]
    opt = MaskedAdamW([p], lr=lr, weight_decay=wd)
    for m, gr in zip(masks, grads):
        opt.set_masks({p: m})
        p.grad = gr.clone()
        opt.step()
    for i in range(n):
        q = torch.nn.Parameter(start[i : i + 1].clone())
        ref = torch.optim.AdamW([q], lr=lr, weight_decay=wd, foreach=False)
        for m, gr in zip(masks, grads):
            if m[i]:
                q.grad = gr[i : i + 1].clone()
                ref.step()
        torch.testing.assert_close(p[i : i + 1], q, rtol=0, atol=1e-6)
    assert p[1] == start[1]
    assert opt.state[p]["step"].tolist() == torch.stack(masks).sum(0).tolist()


def test_masked_adamw_dense_equals_adamw_on_masked_grads() -> None:
    g = torch.Generator().manual_seed(5)
    a = torch.nn.Parameter(torch.randn(20, generator=g))
    b = torch.nn.Parameter(a.detach().clone())
    start = a.detach().clone()
    mask = torch.rand(20, generator=g) < 0.3
    ours = MaskedAdamW([a], lr=1e-2, weight_decay=0.1, dense=True, mask_of=lambda p: mask)
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(3):
        grad = torch.randn(20, generator=g)
        a.grad, b.grad = grad.clone(), grad * mask
        ours.step(), ref.step()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert bool((a != start)[~mask].all())  # decay moved the unmasked entries too


def test_masked_adamw_state_dict_round_trip() -> None:
    p = torch.nn.Parameter(torch.randn(10, dtype=torch.bfloat16))
    opt = MaskedAdamW([p], lr=1e-2)
    for _ in range(3):
        opt.set_masks({p: torch.arange(10) < 4})
        p.grad = torch.ones(10, dtype=torch.bfloat16)
        opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    other = MaskedAdamW([q], lr=1e-2)
    other.load_state_dict(opt.state_dict())
    steps = other.state[q]["step"]
    assert steps.dtype == torch.int32 and steps.tolist() == [3] * 4 + [0] * 6


# --- static masks -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [(FishMask, {}), (ChildTuningD, {}), (ChildTuningD, {"dense_update": False})],
)
def test_static_masks_are_fixed_and_bound_the_delta(cls, kwargs, batch) -> None:
    model = pretrained_like()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    method = cls(keep_ratio=0.002, **kwargs)
    method.apply(model)
    with pytest.raises(ConfigError, match="prepare"):
        method.after_backward(0, 1)
    masks = [m.clone() for m in method.prepare(lambda b: loss_of(model, b), [batch] * 3)]
    assert all(p.grad is None for p in method.parameters())
    assert sum(int(m.sum()) for m in masks) == method.selection.k
    # dense ChildTuningD leaks only through weight decay: train without it to bound the delta
    decay = 0.0 if method.config.dense_update else 0.1
    run_steps(method, model, batch, steps=3, weight_decay=decay)
    assert all(torch.equal(a, b) for a, b in zip(masks, method.masks))
    assert method.selection.refreshes == 1
    for c, m in zip(changed_sets(method, reference), masks):
        assert not bool((c & ~m).any())
    assert method.changed(reference)["backbone"] > 0
    with pytest.raises(ConfigError, match="once"):
        method.prepare(lambda b: loss_of(model, b), [batch])


def test_child_tuning_dense_default_leaks_weight_decay(batch) -> None:
    model = pretrained_like()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    method = ChildTuningD(keep_ratio=0.002)
    method.apply(model)
    method.prepare(lambda: loss_of(model, batch), n_batches=1)
    run_steps(method, model, batch, steps=2, weight_decay=0.1)
    assert method.changed(reference)["backbone"] > 10 * method.selection.k


def test_fish_and_child_tuning_select_differently(batch) -> None:
    """Child-Tuning clips each tensor's gradient before squaring; FISH squares it raw."""
    sets = []
    for cls in (FishMask, ChildTuningD):
        model = pretrained_like()
        method = cls(keep_ratio=0.002)
        method.apply(model)
        sets.append(flat_set(method.prepare(lambda b: 1e3 * loss_of(model, b), [batch], 1)))
    assert sets[0] != sets[1]


def noisy_batches(model: WpeftAurora, n: int, size: int = 1) -> list:
    """``n`` random batches of ``size`` samples that differ from each other."""
    out = []
    for i in range(n):
        b = random_batch(model.config, B=size, H=16, W=32)
        g = torch.Generator().manual_seed(10 + i)
        for v in b.surf_vars.values():
            v.add_(torch.randn(v.shape, generator=g))
        out.append(b)
    return out


def test_fish_fisher_is_the_mean_of_per_example_squared_gradients() -> None:
    """Fed one-sample batches (what FishMask.preparation asks for), FISH's Fisher equals a hand
    loop of per-example squared gradients over the first fisher_samples samples."""
    model = pretrained_like()
    method = FishMask(keep_ratio=0.002, fisher_samples=3)
    method.apply(model)
    samples = noisy_batches(model, 4)
    params = method.selection.params
    hand = [torch.zeros_like(p) for p in params]
    for b in samples[:3]:  # fisher_samples=3: the fourth is not used
        for p in method.parameters():
            p.grad = None
        loss_of(model, b).backward()
        for h, p in zip(hand, params):
            h.add_(p.grad.pow(2))
    for p in method.parameters():
        p.grad = None
    scores, used = method.fisher(lambda b: loss_of(model, b), iter(samples))
    assert used == 3 and all(p.grad is None for p in method.parameters())
    ours = method.selection.layout.split(scores)
    for h, o in zip(hand, ours):
        torch.testing.assert_close(o, h / 3, rtol=1e-6, atol=1e-6)
    masks = method.prepare(lambda b: loss_of(model, b), iter(samples))
    assert method.selection.prepared == {"fisher_samples_used": 3}
    assert method.describe()["selection"]["fisher_samples_used"] == 3
    assert sum(int(m.sum()) for m in masks) == method.selection.k


def test_fish_mask_depends_on_the_samples_it_averages() -> None:
    samples = noisy_batches(pretrained_like(), 3)
    sets = {}
    for n in (1, 3, 100):
        model = pretrained_like()  # the same weights every time
        method = FishMask(keep_ratio=0.002, fisher_samples=n)
        method.apply(model)
        sets[n] = flat_set(method.prepare(functools.partial(loss_of, model), iter(samples)))
        assert method.selection.prepared == {"fisher_samples_used": min(n, 3)}
    assert sets[1] != sets[3]  # one sample's Fisher is not three samples'
    assert sets[3] == sets[100]  # asking for more than there are uses them all


@pytest.mark.parametrize(
    ("method", "train_samples", "batch_size", "expected"),
    [
        (FishMask(), 33, 2, (1, 33)),  # fewer samples than N = 1024: all of them
        (FishMask(fisher_samples=8), 33, 2, (1, 8)),
        (FishMask(), 5000, 16, (1, 1024)),
        (ChildTuningD(), 33, 2, (2, 17)),  # one pass: ceil(33 / 2) batches, the last of one
        (ChildTuningD(), 32, 4, (4, 8)),
        (ChildTuningD(fisher_batches=5), 33, 2, (2, 5)),
        (ChildTuningD(fisher_batches=17), 33, 2, (2, 17)),
    ],
)
def test_static_masks_ask_for_their_papers_data(method, train_samples, batch_size, expected):
    plan = method.preparation(train_samples, batch_size)
    assert (plan.batch_size, plan.batches) == expected


def test_child_tuning_refuses_more_batches_than_the_split_has() -> None:
    with pytest.raises(ConfigError, match=r"fisher_batches=18 is more than the 17 batches of 2 "
                                          r"samples in the training split \(33 samples\)"):
        ChildTuningD(fisher_batches=18).preparation(33, 2)


def test_fish_fisher_batches_of_older_configs_is_refused_naming_fisher_samples() -> None:
    with pytest.raises(ConfigError, match="fisher_batches=8 no longer exists.*fisher_samples"):
        FishMask(fisher_batches=8)
    with pytest.raises(ConfigError, match="fisher_samples must be an integer >= 1.*got 0"):
        FishMaskConfig(fisher_samples=0)


def test_prepared_counts_travel_with_the_selection_state() -> None:
    model = pretrained_like()
    method = ChildTuningD(keep_ratio=0.002)
    method.apply(model)
    method.prepare(lambda b: loss_of(model, b), noisy_batches(model, 2, size=2))
    assert method.describe()["selection"]["fisher_batches_used"] == 2
    other = ChildTuningD(keep_ratio=0.002)
    other.apply(pretrained_like())
    other.selection.load_state_dict(method.selection.state_dict())
    assert other.selection.prepared == {"fisher_batches_used": 2}
    assert flat_set(other.masks) == flat_set(method.masks)


# --- configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [SFASConfig, FishMaskConfig, ChildTuningDConfig])
@pytest.mark.parametrize("ratio", [0.0, 1.5, -0.1, float("nan")])
def test_bad_keep_ratio(config, ratio) -> None:
    with pytest.raises(ConfigError, match=f"keep_ratio .* got {ratio!r}"):
        config(keep_ratio=ratio)


def test_other_bad_configs() -> None:
    with pytest.raises(ConfigError, match="importance"):
        SFASConfig(importance="hessian")
    with pytest.raises(ConfigError, match="noise"):
        SFASConfig(noise="gaussian")
    with pytest.raises(ConfigError, match="accumulate_batches"):
        SFASConfig(accumulate_batches=3, refresh_every=2)
    with pytest.raises(ConfigError, match="refresh_every"):
        SFASConfig(refresh_every=0)
    assert SFASConfig(keep_ratio=1.0).keep_ratio == 1.0


# --- data parallel ------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # one core per rank
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # the global RNG differs per rank; the mask must not care
        model = pretrained_like()
        method = SFAS(keep_ratio=0.002)
        method.apply(model)
        batch = random_batch(model.config, B=1, H=16, W=32)
        g = torch.Generator().manual_seed(rank)
        for v in batch.surf_vars.values():
            v.add_(torch.randn(v.shape, generator=g))
        loss_of(model, batch).backward()
        local = flat_set(topk_masks(fisher_scores(method), method.selection.k))
        for p in method.selection.params:  # what DDP does during backward
            dist.all_reduce(p.grad)
            p.grad.div_(world)
        method.after_backward(2, 10)
        masks = [m.clone() for m in method.masks]
        own = [torch.rand(s, generator=torch.Generator().manual_seed(7 + rank)) < 0.5
               for s in [(50,), (4, 6)]]
        broadcast_mask(own, src=0)
        torch.save({"local": local, "masks": masks, "broadcast": own}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_data_parallel_ranks_draw_the_same_mask() -> None:
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(world, os.path.join(tmp, "init"), tmp), nprocs=world)
        r0, r1 = (torch.load(f"{tmp}/rank{r}.pt", weights_only=False) for r in range(world))
    assert r0["local"] != r1["local"]  # the local gradients really differ
    assert all(torch.equal(a, b) for a, b in zip(r0["masks"], r1["masks"]))
    expected = [
        torch.rand(s, generator=torch.Generator().manual_seed(7)) < 0.5 for s in [(50,), (4, 6)]
    ]
    for r in (r0, r1):
        assert all(torch.equal(a, b) for a, b in zip(r["broadcast"], expected))


# --- FSDP2 shards: one global top-k over the ranks' shards --------------------------------------

SHARD_SHAPES = [(5, 7), (1, 4), (3,), (0,), (4, 2, 2), (7,)]  # uneven, a 1-row and an empty tensor
K = 5  # entries the noise is drawn for (exceedance fraction 2k/N = 0.13)


def _chunk_spans(world: int, rank: int) -> list[Span]:
    """Where rank ``rank`` of ``world`` holds each tensor under dim-0 chunking, by hand."""
    spans = []
    for shape in SHARD_SHAPES:
        rows, row = shape[0], int(torch.Size(shape).numel() // max(shape[0], 1))
        chunk = -(-rows // world)
        first, last = min(rows, rank * chunk), min(rows, (rank + 1) * chunk)
        spans.append(Span(torch.Size(shape), first * row, (last - first) * row))
    return spans


def _shard_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        coll = Collective.of_process_group("cpu")
        spans = _chunk_spans(world, rank)
        g = torch.Generator().manual_seed(0)  # the same full scores on every rank
        out = {"topk": [], "max": None, "noise": None}
        for k in (1, 9, 30, 60, sum(torch.Size(s).numel() for s in SHARD_SHAPES)):
            full = [torch.randint(0, 4, s, generator=g).float() for s in SHARD_SHAPES]  # ties
            mine = [sp.narrow(f).clone() for sp, f in zip(spans, full)]
            for compact in (0.0, 1.0):
                masks = topk_masks(mine, k, chunk_numel=3, compact_fraction=compact, collective=coll)
                out["topk"].append((k, compact, full, coll.gather_full(masks, spans)))
        full = [torch.rand(s, generator=g) * 5 for s in SHARD_SHAPES]
        mine = [sp.narrow(f).clone() for sp, f in zip(spans, full)]
        top = normalise_by_global_max_(mine, coll)
        out["max"] = (float(top), full, coll.gather_full(mine, spans))
        mine = [torch.zeros(sp.numel) for sp in spans]
        perturb_(mine, step=1, total_steps=5, gamma=0.2, kind="additive", seed=3, k=K,
                 spans=spans)
        out["noise"] = coll.gather_full(mine, spans)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_topk_noise_and_max_equal_the_unsharded_ones() -> None:
    """Each of 2 ranks holds dim-0 chunks (uneven, empty) of every tensor: the global top-k over
    the shards is the one-process top-k, ties included; the max and the noise of every entry
    are the unsharded ones; gathered masks are full."""
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_shard_worker, args=(world, os.path.join(tmp, "init"), tmp), nprocs=world)
        results = [torch.load(f"{tmp}/rank{r}.pt", weights_only=False) for r in range(world)]
    for r in results:
        for k, compact, full, gathered in r["topk"]:
            expected = topk_masks(full, k, compact_fraction=compact)
            assert all(torch.equal(a, b) for a, b in zip(gathered, expected)), (k, compact)
            assert sum(int(m.sum()) for m in gathered) == k
        top, full, normalised = r["max"]
        assert top == pytest.approx(max(float(f.max()) for f in full if f.numel()))
        for n, f in zip(normalised, full):
            torch.testing.assert_close(n, f / top)
        reference = [torch.zeros(s) for s in SHARD_SHAPES]
        perturb_(reference, step=1, total_steps=5, gamma=0.2, kind="additive", seed=3, k=K)
        assert all(torch.equal(a, b) for a, b in zip(r["noise"], reference))
    # the 1-row tensor lives on rank 0 only, the others are split
    assert _chunk_spans(2, 1)[1].numel == 0 and _chunk_spans(2, 0)[0].numel == 21


def test_local_collective_is_a_no_op() -> None:
    coll = Collective()
    assert not coll.sharded and coll.sum_ints([3, 4]) == [3, 4]
    assert coll.gather_ints([1, 2]) == [[1, 2]]
    t = torch.tensor([1.0, 2.0])
    assert coll.max_(t) is t and coll.sum_(t) is t
    span = span_of(torch.zeros(3, 2))
    assert span.whole and span.start == 0 and span.numel == 6
    assert torch.equal(coll.gather_full([torch.ones(6)], [span])[0], torch.ones(3, 2))
