"""CompactAdamW: AdamW with state only at the selected entries (lean SFAS).

Checked against the dense reference ``MaskedAdamW`` (per-entry steps), against hand-computed Adam
updates where the two differ on purpose (entries that leave and re-enter the selection start
fresh), and against ``torch.optim.AdamW`` for the dense fallback. All on small CPU tensors.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from wpeft.errors import ConfigError
from wpeft.methods.compact import (
    COMPACT_STATE_BYTES_PER_ENTRY,
    CompactAdamW,
    CompactGrad,
    remap_entries,
)
from wpeft.methods.fisher import MaskedAdamW

LR, WD, EPS, BETAS = 1e-2, 0.1, 1e-8, (0.9, 0.999)


def _mask(shape: tuple[int, ...], idx: torch.Tensor) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    m.view(-1)[idx] = True
    return m


def _compact(grad: torch.Tensor, idx: torch.Tensor) -> CompactGrad:
    return CompactGrad(idx, grad.reshape(-1).index_select(0, idx))


def _params(shapes: list[tuple[int, ...]], seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _grads(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen) for p in params]


def _random_indices(numel: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(numel, generator=gen)[:k].sort().values


# --- remap_entries ------------------------------------------------------------------------------


def test_remap_entries_keeps_shared_drops_old_zeroes_new() -> None:
    old = torch.tensor([2, 5, 7, 11])
    new = torch.tensor([0, 5, 6, 11, 12])  # 5, 11 kept; 2, 7 dropped; 0, 6, 12 new
    m = torch.tensor([1.5, 2.5, 3.5, 4.5])
    age = torch.tensor([3, 4, 5, 6], dtype=torch.int32)
    m_new, age_new = remap_entries(old, new, m, age)
    assert torch.equal(m_new, torch.tensor([0.0, 2.5, 0.0, 4.5, 0.0]))
    assert torch.equal(age_new, torch.tensor([0, 4, 0, 6, 0], dtype=torch.int32))
    assert age_new.dtype == torch.int32 and m_new.dtype == torch.float32
    # new beyond every old index (searchsorted returns n) and before every one (returns 0)
    (far,) = remap_entries(old, torch.tensor([1, 100]), m)
    assert torch.equal(far, torch.tensor([0.0, 0.0]))
    # identical sets: the values themselves, in a new tensor
    (same,) = remap_entries(old, old.clone(), m)
    assert torch.equal(same, m) and same.data_ptr() != m.data_ptr()


def test_remap_entries_empty_sets() -> None:
    empty = torch.zeros(0, dtype=torch.int64)
    (from_empty,) = remap_entries(empty, torch.tensor([3, 9]), torch.zeros(0))
    assert torch.equal(from_empty, torch.zeros(2))
    (to_empty,) = remap_entries(torch.tensor([3, 9]), empty, torch.tensor([1.0, 2.0]))
    assert to_empty.shape == (0,) and to_empty.dtype == torch.float32
    assert remap_entries(empty, empty) == ()


def test_remap_entries_rejects_misaligned_values() -> None:
    with pytest.raises(ValueError, match=r"values\[0\].*aligned with old \(3,\)"):
        remap_entries(torch.tensor([1, 2, 3]), torch.tensor([1]), torch.zeros(2))
    with pytest.raises(ValueError, match="new indices must be 1-D int64"):
        remap_entries(torch.tensor([1, 2]), torch.tensor([1.0]), torch.zeros(2))


# --- agreement with MaskedAdamW -----------------------------------------------------------------


class _FixedPair:
    """CompactAdamW and the reference MaskedAdamW on equal parameters (shapes (7, 5), (40,),
    (3, 4, 6)) with one fixed selection of 9, 13 and 20 entries."""

    def __init__(self) -> None:
        shapes = [(7, 5), (40,), (3, 4, 6)]
        self.ours, self.ref = _params(shapes), _params(shapes)
        self.idx = [_random_indices(p.numel(), k, i)
                    for i, (p, k) in enumerate(zip(self.ours, (9, 13, 20)))]
        self.grads: dict[torch.Tensor, CompactGrad] = {}
        self.opt = CompactAdamW(self.ours, lr=LR, weight_decay=WD, grad_of=self.grads.get)
        masks = {r: _mask(r.shape, i) for r, i in zip(self.ref, self.idx)}
        self.ref_opt = MaskedAdamW(self.ref, lr=LR, weight_decay=WD, mask_of=masks.get)

    def step(self, n: int) -> None:
        """Both optimisers one step on the same gradients (step ``n``'s)."""
        gs = _grads(self.ours, n)
        self.grads.clear()
        self.grads.update({p: _compact(g, i) for p, g, i in zip(self.ours, gs, self.idx)})
        for r, g in zip(self.ref, gs):
            r.grad = g.clone()
        self.opt.step()
        self.ref_opt.step()


def test_fixed_selection_matches_masked_adamw_bitwise() -> None:
    """Same indices every step: bitwise equal to MaskedAdamW's sparse path. Both run the same
    float32 element-wise ops in the same order on same-length gathered tensors, so torch.equal
    (not just allclose) holds on CPU."""
    pair = _FixedPair()
    ours, ref, idx, opt = pair.ours, pair.ref, pair.idx, pair.opt
    start = [p.detach().clone() for p in ours]
    for step in range(6):
        pair.step(step)
    for p, r, p0, i in zip(ours, ref, start, idx):
        assert torch.equal(p, r)
        outside = ~_mask(p.shape, i)
        assert torch.equal(p.detach()[outside], p0[outside])  # unselected: bitwise unchanged
        assert not torch.equal(p.detach(), p0)
        assert torch.equal(opt.state[p]["age"], torch.full((i.numel(),), 6, dtype=torch.int32))


def _adam_reference(
    x: float, gs: list[float | None], lr: float = LR, wd: float = WD
) -> tuple[float, float, float, int]:
    """One entry under the compact policy in float64: None = not selected (state dropped)."""
    m = v = 0.0
    age = 0
    b1, b2 = BETAS
    for g in gs:
        if g is None:
            m, v, age = 0.0, 0.0, 0
            continue
        age += 1
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        x = x * (1 - lr * wd) - lr * (m / (1 - b1**age)) / (
            math.sqrt(v) / math.sqrt(1 - b2**age) + EPS
        )
    return x, m, v, age


def test_changing_selection_reentry_starts_fresh() -> None:
    """Entry 2 is selected at steps 0-1, out at step 2, back at step 3: its step-3 update is
    Adam's step 1 by hand; entries selected throughout match MaskedAdamW bitwise."""
    ours, ref = _params([(10,)]), _params([(10,)])
    (p,), (r,) = ours, ref
    sel = [[0, 2, 5], [0, 2, 5], [0, 5, 7], [0, 2, 5, 7]]  # 0 and 5 throughout; 7 enters at 2
    gen = torch.Generator().manual_seed(3)
    gs = [torch.randn(10, generator=gen) for _ in sel]
    current: dict[str, CompactGrad] = {}
    opt = CompactAdamW([p], lr=LR, weight_decay=WD, grad_of=lambda _: current["cg"])
    mask_now: dict[str, torch.Tensor] = {}
    ref_opt = MaskedAdamW([r], lr=LR, weight_decay=WD, mask_of=lambda _: mask_now["m"])
    before_step3 = None
    for step, (s, g) in enumerate(zip(sel, gs)):
        idx = torch.tensor(s)
        current["cg"] = _compact(g, idx)
        mask_now["m"] = _mask((10,), idx)
        r.grad = g.clone()
        if step == 3:
            before_step3 = p.detach().clone()
        opt.step()
        ref_opt.step()
    assert before_step3 is not None
    state = opt.state[p]
    p, r = p.detach(), r.detach()
    # hand-computed fresh step: p(1 - lr wd) - lr g / (|g| + eps)
    g2 = float(gs[3][2])
    fresh = float(before_step3[2]) * (1 - LR * WD) - LR * g2 / (abs(g2) + EPS)
    assert float(p[2]) == pytest.approx(fresh, rel=1e-6, abs=1e-7)
    assert abs(float(r[2]) - fresh) > 1e-4  # MaskedAdamW resumed stale moments instead
    # entries kept throughout: identical to the dense reference
    for e in (0, 5):
        assert torch.equal(p[e], r[e])
    # the whole trajectory against a float64 hand-rolled reference under the compact policy
    x0 = _params([(10,)])[0].detach()
    assert torch.equal(state["indices"], torch.tensor([0, 2, 5, 7]))
    assert torch.equal(state["age"], torch.tensor([4, 1, 4, 2], dtype=torch.int32))
    for slot, e in enumerate((0, 2, 5, 7)):
        per_step = [float(g[e]) if e in s else None for s, g in zip(sel, gs)]
        x, m, v, age = _adam_reference(float(x0[e]), per_step)
        assert float(p[e]) == pytest.approx(x, rel=1e-6, abs=1e-7)
        assert float(state["exp_avg"][slot]) == pytest.approx(m, rel=1e-6)
        assert float(state["exp_avg_sq"][slot]) == pytest.approx(v, rel=1e-5)
        assert int(state["age"][slot]) == age
    # entries never selected (and entry 7 before step 2) did not move
    never = [1, 3, 4, 6, 8, 9]
    assert torch.equal(p.detach()[never], x0[never])


def test_many_parameters_changing_at_once_follow_the_policy_each() -> None:
    """A refresh moves every parameter's selection in one step (carried over together):
    per entry the float64 compact-policy reference, whatever the others do. One parameter swaps
    entries at an equal count (only the values tell it changed), one empties and comes back,
    one keeps its selection, one grows."""
    shapes = [(10,), (4, 5), (7,), (3, 3)]
    sel = [
        [[1, 4, 8], [1, 4, 8], [1, 5, 8], [1, 5, 8], [0, 4, 9]],
        [[0, 19], [], [], [3, 19], [0, 3, 19]],
        [[2, 6], [2, 6], [2, 6], [2, 6], [2, 6]],
        [[4], [0, 4], [0, 4, 8], [0, 1, 4, 8], [4]],
    ]
    params = _params(shapes, seed=4)
    x0 = [p.detach().clone().reshape(-1) for p in params]
    gen = torch.Generator().manual_seed(9)
    gs = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(5)]
    current: dict[torch.Tensor, CompactGrad] = {}
    opt = CompactAdamW(params, lr=LR, weight_decay=WD, grad_of=current.get)
    for step in range(5):
        current.clear()
        current.update({
            p: _compact(gs[step][i], torch.tensor(sel[i][step], dtype=torch.int64))
            for i, p in enumerate(params)
        })
        opt.step()
    for i, p in enumerate(params):
        flat, state = p.detach().reshape(-1), opt.state[p]
        assert state["indices"].tolist() == sel[i][-1]
        for e in range(flat.numel()):
            per_step = [float(gs[t][i].reshape(-1)[e]) if e in sel[i][t] else None
                        for t in range(5)]
            if all(g is None for g in per_step):
                assert torch.equal(flat[e], x0[i][e])  # never selected: never moved
                continue
            x, m, v, age = _adam_reference(float(x0[i][e]), per_step)
            assert float(flat[e]) == pytest.approx(x, rel=1e-6, abs=1e-7), (i, e)
            if e in sel[i][-1]:
                slot = sel[i][-1].index(e)
                assert float(state["exp_avg"][slot]) == pytest.approx(m, rel=1e-6, abs=1e-12)
                assert float(state["exp_avg_sq"][slot]) == pytest.approx(v, rel=1e-5, abs=1e-12)
                assert int(state["age"][slot]) == age


def test_dense_grad_of_compact_parameter_is_ignored() -> None:
    (p,), (q,) = _params([(6,)]), _params([(6,)])
    idx = torch.tensor([1, 4])
    g = torch.randn(6, generator=torch.Generator().manual_seed(5))
    CompactAdamW([p], lr=LR, grad_of=lambda _: _compact(g, idx)).step()
    q.grad = torch.full((6,), 1e3)  # garbage dense gradient: must change nothing
    CompactAdamW([q], lr=LR, grad_of=lambda _: _compact(g, idx)).step()
    assert torch.equal(p, q)
    assert torch.equal(q.grad, torch.full((6,), 1e3))


# --- state size ---------------------------------------------------------------------------------


def test_state_holds_only_selected_entries() -> None:
    big = torch.nn.Parameter(torch.zeros(1000, 1000))
    head = torch.nn.Parameter(torch.zeros(3, 4))
    k = 3000
    opt = CompactAdamW([big, head], lr=LR)
    for step in range(3):
        idx = _random_indices(big.numel(), k, step)  # a different selection each step
        opt.grad_of = lambda p, idx=idx: CompactGrad(idx, torch.ones(k)) if p is big else None
        head.grad = torch.ones(3, 4)
        opt.step()
    state = opt.state[big]
    assert set(state) == {"indices", "exp_avg", "exp_avg_sq", "age"}
    assert {key: (t.shape, t.dtype) for key, t in state.items()} == {
        "indices": ((k,), torch.int64),
        "exp_avg": ((k,), torch.float32),
        "exp_avg_sq": ((k,), torch.float32),
        "age": ((k,), torch.int32),
    }
    assert COMPACT_STATE_BYTES_PER_ENTRY == 20
    dense_bytes = 4 + 2 * 4 * head.numel()  # float32 scalar step + two float32 moments
    assert opt.state_bytes() == 20 * k + dense_bytes
    assert all(t.numel() < big.numel() for st in opt.state.values() for t in st.values())
    assert int((big != 0).sum()) > k  # the union of three selections moved


# --- resume -------------------------------------------------------------------------------------


def _run_steps(
    opt: CompactAdamW,
    params: list[torch.nn.Parameter],
    steps: range,
) -> None:
    """Steps with a selection that changes every step on the first two parameters; the third
    is dense (a head)."""
    selected, head = params[:2], params[2]
    for step in steps:
        gs = _grads(params, step)
        cgs = {
            p: _compact(g, _random_indices(p.numel(), 5 + step, 10 * step + i))
            for i, (p, g) in enumerate(zip(selected, gs))
        }
        opt.grad_of = cgs.get
        head.grad = gs[2]
        opt.step()


@pytest.mark.parametrize("through_bytes", [False, True], ids=["in_memory", "torch_save"])
def test_resume_is_bitwise(through_bytes: bool) -> None:
    shapes = [(6, 5), (24,), (4,)]
    straight = _params(shapes)
    opt = CompactAdamW(straight, lr=LR, weight_decay=WD)
    _run_steps(opt, straight, range(8))

    first = _params(shapes)
    opt1 = CompactAdamW(first, lr=LR, weight_decay=WD)
    _run_steps(opt1, first, range(4))
    saved = opt1.state_dict()
    if through_bytes:
        buf = io.BytesIO()
        torch.save(saved, buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
    second = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2 = CompactAdamW(second, lr=LR, weight_decay=WD)
    opt2.load_state_dict(saved)
    for key, dtype in (("indices", torch.int64), ("age", torch.int32), ("exp_avg", torch.float32)):
        assert opt2.state[second[0]][key].dtype == dtype
    _run_steps(opt2, second, range(4, 8))
    for a, b in zip(straight, second):
        assert torch.equal(a, b)
    assert opt2.state_bytes() == opt.state_bytes()


# --- dense fallback -----------------------------------------------------------------------------


def test_dense_parameters_match_torch_adamw_and_idle_ones_stay() -> None:
    (head, idle, sel), (ref_head,) = _params([(5, 3), (4,), (8,)]), _params([(5, 3)])
    idle0 = idle.detach().clone()
    idx = torch.tensor([3])
    opt = CompactAdamW([head, idle, sel], lr=LR, weight_decay=WD)
    opt.grad_of = lambda p: _compact(torch.ones(8), idx) if p is sel else None
    ref = torch.optim.AdamW([ref_head], lr=LR, weight_decay=WD, eps=EPS, betas=BETAS)
    for step in range(5):
        (g,) = _grads([head], step)
        head.grad, ref_head.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(head, ref_head, rtol=1e-6, atol=1e-7)
    assert not torch.equal(head.detach(), _params([(5, 3)])[0].detach())
    assert torch.equal(idle, idle0) and len(opt.state[idle]) == 0


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("indices", "values", "match"),
    [
        (torch.tensor([3, 1]), torch.zeros(2), "not strictly increasing"),
        (torch.tensor([2, 2]), torch.zeros(2), "not strictly increasing"),
        (torch.tensor([-1, 2]), torch.zeros(2), "negative index"),
        (torch.tensor([1, 12]), torch.zeros(2), r"index >= numel.*\[0, 12\)"),
        (torch.tensor([1, 2], dtype=torch.int32), torch.zeros(2), "1-D int64.*torch.int32"),
        (torch.tensor([[1, 2]]), torch.zeros(2), r"1-D int64, got \(1, 2\)"),
        (torch.tensor([1, 2]), torch.zeros(3), r"as long as the 2 indices, got \(3,\)"),
        (torch.tensor([1, 2]), torch.zeros(2, dtype=torch.int64), "float tensor"),
    ],
)
def test_bad_compact_grad_is_rejected_before_any_update(
    indices: torch.Tensor, values: torch.Tensor, match: str
) -> None:
    good, bad = _params([(5,), (3, 4)])
    good0, bad0 = good.detach().clone(), bad.detach().clone()
    cgs = {
        good: CompactGrad(torch.tensor([0, 4]), torch.ones(2)),
        bad: CompactGrad(indices, values),
    }
    opt = CompactAdamW([good, bad], lr=LR, grad_of=cgs.get)
    with pytest.raises(ValueError, match=r"parameter \(3, 4\)") as err:
        opt.step()
    assert err.match(match)
    assert torch.equal(good, good0) and torch.equal(bad, bad0)  # nothing moved
    assert len(opt.state[good]) == 0


def test_bad_settings_and_mode_switches() -> None:
    (p,) = _params([(4, 4)])
    with pytest.raises(ConfigError, match="lr=-1"):
        CompactAdamW([p], lr=-1)
    with pytest.raises(ConfigError, match=r"betas.*\(0.9, 1.0\)"):
        CompactAdamW([p], betas=(0.9, 1.0))
    # non-contiguous parameter
    t = torch.nn.Parameter(torch.zeros(4, 4).t())
    opt = CompactAdamW([t], grad_of=lambda _: CompactGrad(torch.tensor([1]), torch.ones(1)))
    with pytest.raises(ValueError, match="not contiguous"):
        opt.step()
    # compact then dense-only
    cg: dict[str, CompactGrad | None] = {"cg": CompactGrad(torch.tensor([1]), torch.ones(1))}
    opt = CompactAdamW([p], grad_of=lambda _: cg["cg"])
    opt.step()
    cg["cg"], p.grad = None, torch.ones(4, 4)
    with pytest.raises(RuntimeError, match="switching to dense updates is not supported"):
        opt.step()
    # dense then compact
    (q,) = _params([(4,)])
    q.grad = torch.ones(4)
    opt = CompactAdamW([q])
    opt.step()
    opt.grad_of = lambda _: CompactGrad(torch.tensor([1]), torch.ones(1))
    with pytest.raises(RuntimeError, match="switching to compact updates is not supported"):
        opt.step()


# --- bfloat16 -----------------------------------------------------------------------------------


def test_bfloat16_parameter_float32_moments_and_exact_round_trip() -> None:
    """Indices above 256 are not representable in bfloat16: torch's default load would round
    them (and cast the moments to bfloat16); the compact state must come back exactly."""
    p = torch.nn.Parameter(torch.ones(1000, dtype=torch.bfloat16))
    idx = torch.tensor([3, 257, 511, 999])
    vals = torch.tensor([1.0, -2.0, 0.5, 3.0])
    opt = CompactAdamW([p], lr=0.25, grad_of=lambda _: CompactGrad(idx, vals))
    opt.step()
    # step 1: p - lr * sign(g) = 1 -/+ 0.25, exactly representable in bfloat16
    assert p.dtype == torch.bfloat16
    assert p[idx].float().tolist() == [0.75, 1.25, 0.75, 0.75]
    assert int((p != 1).sum()) == 4
    state = opt.state[p]
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    q = torch.nn.Parameter(p.detach().clone())
    other = CompactAdamW([q], lr=0.25)
    other.load_state_dict(torch.load(buf, weights_only=True))
    for key, t in state.items():
        assert other.state[q][key].dtype == t.dtype and torch.equal(other.state[q][key], t)
    other.grad_of = opt.grad_of
    opt.step()
    other.step()
    assert torch.equal(p, q)


def test_indices_changed_in_place_are_checked_again() -> None:
    """The same index tensor passed again skips the checks; changed in place since, it is checked
    (and refused) again before anything moves."""
    (p,) = _params([(10,)])
    idx = torch.tensor([1, 4, 7])
    opt = CompactAdamW([p], lr=LR, grad_of=lambda q: CompactGrad(idx, torch.ones(3)))
    opt.step()
    opt.step()
    before = p.detach().clone()
    idx[2] = 2  # in place: no longer increasing
    with pytest.raises(ValueError, match="not strictly increasing"):
        opt.step()
    assert torch.equal(p, before)
    assert torch.equal(opt.state[p]["age"], torch.full((3,), 2, dtype=torch.int32))


def test_state_is_one_flat_tensor_per_term_and_is_rebuilt_when_replaced() -> None:
    """After a step every parameter's moments and ages are slices of one flat tensor per term
    (each term of the update is one op); a changed selection or a loaded state dict replaces
    the slices, and the next step makes them slices of new flat tensors, with the same updates
    as MaskedAdamW while the selection holds."""
    pair = _FixedPair()
    ours, ref, opt, step = pair.ours, pair.ref, pair.opt, pair.step

    def one_flat() -> bool:
        return all(
            len({opt.state[p][key].untyped_storage().data_ptr() for p in ours}) == 1
            for key in ("exp_avg", "exp_avg_sq", "age")
        )

    step(0)
    assert one_flat()
    flat = opt._flat[next(iter(opt._flat))].exp_avg
    assert flat.numel() == 9 + 13 + 20
    sd = io.BytesIO()
    torch.save(opt.state_dict(), sd)
    sd.seek(0)
    opt.load_state_dict(torch.load(sd))
    assert not one_flat()  # loaded: separate tensors
    step(1)
    assert one_flat() and opt._flat[next(iter(opt._flat))].exp_avg is not flat
    for p, r in zip(ours, ref):
        assert torch.equal(p, r)
