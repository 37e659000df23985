"""Lean SFAS / WeatherPEFT (``lean=True``): k-sized state, gradients consumed during backward,
sampled linear-layer gradients between refreshes, and everything the dense path guarantees.

The dense path (``lean=False``, :class:`~wpeft.methods.fisher.MaskedAdamW`) is the reference:
with the mask refreshed every step, a lean run whose every streamed top-k is proven exact follows
it bitwise.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from killing import train_killed_during_step
from safetensors.torch import load_file
from test_backbone import random_batch
from test_methods import loss_of, pretrained_like
from torch import nn

from wpeft.backbones.aurora_adapter import build_backbone
from wpeft.errors import ConfigError
from wpeft.methods import create_method
from wpeft.methods.compact import COMPACT_STATE_BYTES_PER_ENTRY, CompactAdamW
from wpeft.methods.lean import LeanSelection, clip_grad_norm_, pack_bits, set_bits_, unpack_bits
from wpeft.training.loop import TrainConfig, train


@pytest.fixture(scope="module")
def batch():
    return random_batch(build_backbone("tiny").config, B=1)


def backbone_params(method) -> list[nn.Parameter]:
    return list(method.selection.params)


def step_once(method, model, batch, opt, step: int, total: int) -> None:
    opt.zero_grad(set_to_none=True)
    method.before_backward(step, total)
    loss_of(model, batch).backward()
    method.after_backward(step, total)
    opt.step()


def test_bit_set_round_trip_and_new_counts() -> None:
    bits = pack_bits(torch.tensor([0, 3, 8, 17]), 20)
    assert bits.tolist() == [0b1001, 0b1, 0b10]
    assert set_bits_(bits, torch.tensor([3, 4, 19])) == 2  # 3 was set already
    expected = torch.zeros(20, dtype=torch.bool)
    expected[[0, 3, 4, 8, 17, 19]] = True
    assert torch.equal(unpack_bits(bits, 20), expected)


def test_lean_follows_the_dense_reference_bitwise_while_its_top_k_is_proven_exact(batch) -> None:
    """Two refreshes: no entry can leave and re-enter the mask yet, the one case where the
    compact state (fresh moments on re-entry) and MaskedAdamW (moments kept) part ways."""
    steps, total = 2, 6
    runs = {}
    for lean in (False, True):
        model = pretrained_like()
        method = create_method("sfas", keep_ratio=0.003, lean=lean, seed=3)
        method.apply(model)
        opt = method.optimizer(lr=1e-2, weight_decay=0.1)
        masks = []
        for step in range(steps):
            step_once(method, model, batch, opt, step, total)
            masks.append([m.clone() for m in method.selection.masks])
        runs[lean] = (model, method, masks)
    (dense_model, _, dense_masks), (lean_model, lean_method, lean_masks) = runs[False], runs[True]
    sel = lean_method.selection
    assert isinstance(sel, LeanSelection) and sel.refreshes == steps
    for step in range(steps):
        assert sum(int(m.sum()) for m in lean_masks[step]) == sel.k  # exactly k, always
    assert sel.exact_refreshes == steps, "the streamed top-k was not proven exact on tiny"
    for a, b in zip(dense_masks, lean_masks):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    for (name, p), q in zip(dense_model.named_parameters(), lean_model.parameters()):
        assert torch.equal(p, q), name
    union = [torch.stack(ms).any(0) for ms in zip(*lean_masks)]
    assert all(torch.equal(u, v) for u, v in zip(union, sel.union_masks))
    assert sel.union_size() == sum(int(u.sum()) for u in union)


def test_gradient_square_sums_are_taken_on_recorded_steps_only(batch, tmp_path) -> None:
    """Σg² of every gradient (a pass over it) is what the Fisher records need, on recorded
    steps: a lean refresh takes it then (equal to the dense records' numbers) and skips it on
    the other steps, and again on every step once the recorder is removed."""
    from wpeft.runs.fisher_records import FisherRecorder

    model = pretrained_like()
    method = create_method("sfas", keep_ratio=0.003, lean=True, seed=3)
    method.apply(model)
    opt = method.optimizer(lr=1e-2, weight_decay=0.1)
    sel = method.selection
    recorder = FisherRecorder(method, tmp_path / "run", every=2).install()
    total, taken = 5, []
    for step in range(total):
        step_once(method, model, batch, opt, step, total)
        taken.append(bool(torch.isfinite(sel.last.square_sums).all()))
        if step == 2:  # the records' totals: Σg² of each gradient, > its share in the mask
            inside = sel.grad_square_sums(sel.masks)
            assert bool((sel.last.square_sums >= inside).all())
            assert bool((sel.last.square_sums > 0).any())
    assert taken == [True, False, True, False, True]  # steps 0, 2 and the last
    assert bool(torch.isnan(sel.last.square_sums).any()) is False
    recorder.remove()
    assert sel.square_sums_due is None
    step_once(method, model, batch, opt, 6, 8)  # due for a recorder, which is gone
    assert bool(torch.isnan(sel.last.square_sums).all())


def test_refresh_time_counts_the_draws_made_at_begin(batch, monkeypatch) -> None:
    """``refresh_seconds`` covers the whole refresh: the draws of Z at ``begin_step`` (here
    made to take 0.2 s) as well as the scoring in the hooks and the final top-k; a step between
    refreshes leaves it as it was."""
    model = pretrained_like()
    method = create_method("sfas", keep_ratio=0.003, lean=True, refresh_every=2)
    method.apply(model)
    opt = method.optimizer(lr=1e-2, weight_decay=0.1)
    sel = method.selection
    begin = sel.stream.begin

    def slow_begin(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.2)
        begin(*args, **kwargs)

    monkeypatch.setattr(sel.stream, "begin", slow_begin)
    t0 = time.perf_counter()
    step_once(method, model, batch, opt, 0, 4)
    whole = time.perf_counter() - t0
    assert 0.2 <= sel.refresh_seconds <= whole
    last = sel.refresh_seconds
    step_once(method, model, batch, opt, 1, 4)  # no refresh
    assert sel.refresh_seconds == last


def test_no_backbone_gradient_outlives_its_hook_and_state_is_k_sized(batch) -> None:
    model = pretrained_like()
    method = create_method("weatherpeft", keep_ratio=0.003, lean=True)
    method.apply(model)
    params = backbone_params(method)
    before = [p.detach().clone() for p in params]
    alive = []

    def spy(_p: torch.Tensor) -> None:  # runs after the method's hook on the same tensor
        alive.append(sum(q.grad is not None for q in params))

    handles = [p.register_post_accumulate_grad_hook(spy) for p in params]
    opt = method.optimizer(lr=1e-3, weight_decay=0.0)
    for step in range(2):
        step_once(method, model, batch, opt, step, 2)
    for h in handles:
        h.remove()
    assert alive and max(alive) == 0  # each gradient was consumed before the next one existed
    assert all(p.grad is None for p in params)
    sel = method.selection
    moved = 0
    for p, b, union in zip(params, before, sel.union_masks):
        changed = p.detach() != b
        assert not (changed & ~union).any()  # changed entries lie inside the union of the masks
        moved += int(changed.sum())
    assert 0 < moved <= sel.union_size()
    k = sel.k
    states = [opt.state[p] for p in params if p in opt.state]
    assert sum(s["indices"].numel() for s in states) <= k
    assert all(s["exp_avg"].numel() < p.numel() or p.numel() <= 1 for p, s in zip(params, states))
    backbone_state = sum(
        t.numel() * t.element_size() for s in states for t in s.values() if torch.is_tensor(t)
    )
    assert backbone_state == COMPACT_STATE_BYTES_PER_ENTRY * sum(s["indices"].numel() for s in states)
    numels = [p.numel() for p in params]
    assert method.state_bytes() == 8 * k + sum((n + 7) // 8 for n in numels)
    dense_state = 12 * sum(numels)  # MaskedAdamW: two fp32 moments and an int32 step per entry
    assert (backbone_state + method.state_bytes()) / dense_state < 0.02


def test_between_refreshes_linear_weights_get_only_sampled_gradients(batch) -> None:
    model = pretrained_like()
    method = create_method("sfas", keep_ratio=0.01, lean=True, refresh_every=3)
    method.apply(model)
    opt = method.optimizer(lr=1e-3, weight_decay=0.0)
    step_once(method, model, batch, opt, 0, 6)  # the refresh
    sel = method.selection
    linear_weights = {id(m.weight) for m in model.backbone.modules() if isinstance(m, nn.Linear)}
    assert linear_weights

    # the dense gradient at step 1, from a plain copy of the model (no hooks)
    plain = pretrained_like()
    plain.load_state_dict(model.state_dict())
    loss_of(plain, batch).backward()
    dense = {name: p.grad for name, p in plain.named_parameters()}

    dense_hook_calls = []
    handles = [
        p.register_post_accumulate_grad_hook(
            lambda p: dense_hook_calls.append(id(p)) if p.grad is not None else None
        )
        for p in sel.params if id(p) in linear_weights
    ]
    opt.zero_grad(set_to_none=True)
    method.before_backward(1, 6)
    loss_of(model, batch).backward()
    method.after_backward(1, 6)
    for h in handles:
        h.remove()
    assert dense_hook_calls == []  # no dense (out, in) gradient was ever accumulated
    assert sel.refreshes == 1
    names = dict(zip(sel.params, sel.names))
    checked = 0
    for p in sel.params:
        cg = method.selection.compact_grad_of(p)
        want = dense[names[p].removeprefix("model.")].reshape(-1)[cg.indices]
        # float32 sums in another order: close relative to the tensor's largest gradient
        scale = float(dense[names[p].removeprefix("model.")].abs().max())
        torch.testing.assert_close(cg.values, want, rtol=1e-5, atol=1e-5 * scale)
        checked += id(p) in linear_weights and cg.indices.numel() > 0
    assert checked > 5


def test_clipping_counts_the_compact_values_in_the_global_norm() -> None:
    head = nn.Parameter(torch.zeros(2))
    head.grad = torch.tensor([3.0, 0.0])
    values = [torch.tensor([4.0]), torch.tensor([0.0, 12.0])]
    norm = clip_grad_norm_([head], values, max_norm=6.5)
    assert float(norm) == pytest.approx(13.0)  # sqrt(9 + 16 + 144)
    scale = 6.5 / (13.0 + 1e-6)
    torch.testing.assert_close(head.grad, torch.tensor([3.0 * scale, 0.0]))
    torch.testing.assert_close(values[1], torch.tensor([0.0, 12.0 * scale]))
    untouched = [torch.tensor([1.0])]
    assert float(clip_grad_norm_([], untouched, max_norm=5.0)) == pytest.approx(1.0)
    assert untouched[0].item() == 1.0


def test_lean_refuses_what_it_cannot_do(batch) -> None:
    method = create_method("sfas", lean=True)
    method.check_strategy("none")
    for strategy in ("ddp", "fsdp"):
        with pytest.raises(ConfigError, match="lean=True, which runs on one process"):
            method.check_strategy(strategy)
    for kwargs in ({"accumulate_batches": 2, "refresh_every": 2}, {"union_cap": 0.5},
                   {"dense_update": True}, {"broadcast_masks": True}):
        with pytest.raises(ConfigError, match="lean=True does not support " + next(iter(kwargs))):
            create_method("sfas", lean=True, **kwargs)
    model = pretrained_like()
    method.apply(model)
    with pytest.raises(RuntimeError, match=r"call method.before_backward\(step, total_steps\)"):
        loss_of(model, batch).backward()


def test_lean_weatherpeft_run_resumes_exactly_after_a_kill(tmp_path, monkeypatch) -> None:
    world = {"nlat": 16, "nlon": 32, "days": 12, "spinup_days": 1, "ensemble_inits": 8,
             "ensemble_members": 3}
    monkeypatch.setenv("WPEFT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = TrainConfig(
        task="downscaling", method="weatherpeft", steps=5, batch_size=2, warmup_steps=1,
        checkpoint_every=2, record_every=2, task_options={"world": world}, device="cpu",
        budget=0.04, method_options={"lean": True, "refresh_every": 2},
    )
    full = train(cfg, tmp_path / "full", progress=False)
    train_killed_during_step(monkeypatch, cfg, tmp_path / "killed", 4, optimizer=CompactAdamW)
    resumed = train(cfg, tmp_path / "killed", resume=True, progress=False)
    a = load_file(str(tmp_path / "full" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["scores"] == full["scores"]
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    selection = summary["selection"]
    assert selection["refreshes"] == 3 and 0 <= selection["lean"]["exact_refreshes"] <= 3
    # changed entries lie inside the union of the masks
    assert summary["changed"]["backbone"] <= selection["union"]


@pytest.mark.parametrize("name", ["fish", "child_tuning_d"])
def test_lean_static_masks_select_the_dense_mask_and_keep_k_sized_state(name: str, batch) -> None:
    steps = 3
    runs = {}
    for lean in (False, True):
        model = pretrained_like()
        method = create_method(name, keep_ratio=0.003, lean=lean, dense_update=False)
        method.apply(model)
        method.prepare(lambda model=model: loss_of(model, batch), n_batches=1)
        prepared = [m.clone() for m in method.selection.masks]
        opt = method.optimizer(lr=1e-2, weight_decay=0.1)
        for step in range(steps):
            step_once(method, model, batch, opt, step, steps)
        runs[lean] = (model, method, opt, prepared)
    dense_model, _, _, dense_mask = runs[False]
    lean_model, method, opt, lean_mask = runs[True]
    assert all(torch.equal(a, b) for a, b in zip(dense_mask, lean_mask))  # the same Fisher top-k
    assert all(torch.equal(a, b) for a, b in zip(lean_mask, method.selection.masks))  # fixed
    assert sum(int(m.sum()) for m in lean_mask) == method.selection.k
    pristine = dict(pretrained_like().named_parameters())
    for (n, p), q in zip(dense_model.named_parameters(), lean_model.parameters()):
        # the same entries move, by the same updates up to float32 summation order
        assert torch.equal(p != pristine[n], q != pristine[n]), n
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    params = list(method.selection.params)
    assert all(p.grad is None for p in params)
    full_state = 8 * sum(p.numel() for p in params)  # AdamW's two fp32 moments
    state = opt.state_bytes() + method.state_bytes()
    assert state / full_state < 0.05


def test_the_planner_models_the_lean_state_as_measured(batch) -> None:
    from wpeft.distributed.inventory import inventory

    inv = inventory("tiny", "weatherpeft", method_options={"lean": True})
    model = pretrained_like()
    method = create_method("weatherpeft", lean=True)
    method.apply(model)
    opt = method.optimizer(lr=1e-3, weight_decay=0.01)
    for step in range(2):
        step_once(method, model, batch, opt, step, 2)
    assert inv.optimizer == "CompactAdamW"
    assert inv.optimizer_bytes == opt.state_bytes()  # every state tensor, counted exactly
    assert inv.method_state_bytes == method.state_bytes()
    eligible = [p.numel() for p in method.selection.params]
    assert inv.gradient_numel == inv.with_grad - sum(eligible) + max(eligible) + method.selection.k
    # the streamed top-k's candidate pool, at its bound, is backward's transient too
    stream = method.selection.stream
    assert inv.selection_transient_bytes == stream.pool_bytes() > 0
    assert stream.pool_bytes() == 2 * 20 * min(
        stream.total, (stream.hold_at + 1) * stream.budget + (1 << 20)
    )
    from wpeft.distributed.plan import PlanRequest, plan

    planned = plan(PlanRequest(backbone="tiny", method="weatherpeft", gpus=1, batch=1,
                               grid=(32, 64), method_options={"lean": True}))
    assert planned.strategy("none").transient == (
        planned.activations.backward_transient + stream.pool_bytes()
    )
    assert inventory("tiny", "weatherpeft").selection_transient_bytes == 0  # dense: none
