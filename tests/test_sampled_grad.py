"""Sampled weight gradients of linear layers (``wpeft.methods.sampled_grad``).

Checked against the dense gradient (``grad_outᵀ · x`` and plain ``nn.Linear`` autograd) on small
tensors, a small MLP (plain, under activation checkpointing, under autocast) and the tiny Aurora
backbone.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import pytest
import torch
from test_backbone import random_batch
from torch import nn
from torch.utils.checkpoint import checkpoint

from wpeft.backbones.aurora_adapter import build_backbone
from wpeft.errors import ConfigError
from wpeft.methods.sampled_grad import SampledLinearGrads, sampled_weight_grad

# --- helpers ------------------------------------------------------------------------------------


def dense_at(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The brief's reference: the dense weight gradient, flattened, at ``indices``."""
    g, a = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
    return (g.T @ a).reshape(-1)[indices]


def random_indices(numel: int, k: int, seed: int = 0) -> torch.Tensor:
    """``k`` distinct sorted int64 flat indices in ``[0, numel)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(numel, generator=g)[:k].sort().values


def mlp() -> nn.Sequential:
    """Three linears, the middle one without bias."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5, bias=False), nn.Tanh(), nn.Linear(5, 3)
    )


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


class Recorder:
    """A sink that keeps every call."""

    def __init__(self) -> None:
        self.calls: dict[str, list[torch.Tensor]] = defaultdict(list)

    def __call__(self, name: str, values: torch.Tensor) -> None:
        self.calls[name].append(values)


def every_module_indices(
    model: nn.Module, fraction: float, seed: int = 0
) -> dict[str, torch.Tensor]:
    return {
        n: random_indices(m.weight.numel(), max(1, round(fraction * m.weight.numel())), seed + i)
        for i, (n, m) in enumerate(linears(model).items())
    }


def run(model: nn.Module, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Backward of a weighted sum of the outputs; returns the input's gradient."""
    x = x.detach().clone().requires_grad_(True)
    (model(x) * weights).sum().backward()
    assert x.grad is not None
    return x.grad


# --- 1. the sampled product ---------------------------------------------------------------------


def test_hand_computed_values() -> None:
    # W (2, 3); two positions: g = [[1, 2], [3, 4]], x = [[1, 0, 2], [0, 1, 1]]
    # dW = gᵀ x = [[1, 3, 5], [2, 4, 8]] -> flat [1, 3, 5, 2, 4, 8]
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]])
    got = sampled_weight_grad(g, x, torch.tensor([1, 2, 5]), chunk=2)
    assert got.dtype == torch.float32
    assert got.tolist() == [3.0, 5.0, 8.0]


@pytest.mark.parametrize("lead", [(37,), (3, 11)], ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k,chunk", [(40, 7), (40, 1 << 14), (0, 5)])
def test_equals_dense_gradient(
    lead: tuple[int, ...], dtype: torch.dtype, k: int, chunk: int
) -> None:
    g = torch.Generator().manual_seed(1)
    n_out, n_in = 9, 13
    grad_out = torch.randn(*lead, n_out, generator=g, dtype=dtype)
    x = torch.randn(*lead, n_in, generator=g, dtype=dtype)
    idx = random_indices(n_out * n_in, k)
    got = sampled_weight_grad(grad_out, x, idx, chunk=chunk)
    want = dense_at(grad_out, x, idx)
    assert got.shape == (k,)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_bf16_inputs_accumulate_in_float32() -> None:
    # 4096 positions of bf16 products: a bf16 accumulator would be off by ~1e-1 relative.
    g = torch.Generator().manual_seed(2)
    grad_out = torch.randn(4096, 4, generator=g).to(torch.bfloat16)
    x = torch.randn(4096, 3, generator=g).to(torch.bfloat16)
    idx = torch.arange(12)
    got = sampled_weight_grad(grad_out, x, idx, chunk=5)
    assert got.dtype == torch.float32
    want = dense_at(grad_out.double(), x.double(), idx).float()  # exact products of the bf16s
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


# --- 2. SampledLinearGrads on a small MLP -------------------------------------------------------


def test_active_sink_gets_dense_values_and_no_weight_grad() -> None:
    model, plain = mlp(), mlp()
    x, w = torch.randn(4, 7, 6), torch.randn(4, 7, 3)
    gx_plain = run(plain, x, w)
    sink = Recorder()
    sampled = SampledLinearGrads(linears(model), sink)
    indices = every_module_indices(model, 0.3)
    sampled.set_indices(indices)
    gx = run(model, x, w)

    torch.testing.assert_close(gx, gx_plain)
    for name, m in linears(model).items():
        ref = linears(plain)[name]
        assert m.weight.grad is None, name
        assert len(sink.calls[name]) == 1, name
        values = sink.calls[name][0]
        assert values.dtype == torch.float32 and values.shape == indices[name].shape
        torch.testing.assert_close(values, ref.weight.grad.reshape(-1)[indices[name]])
        if m.bias is not None:
            torch.testing.assert_close(m.bias.grad, ref.bias.grad)
    assert set(sink.calls) == set(indices)


@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["2d", "3d"])
def test_inactive_is_bitwise_nn_linear(lead: tuple[int, ...]) -> None:
    model, plain = mlp(), mlp()
    x, w = torch.randn(*lead, 6), torch.randn(*lead, 3)
    sink = Recorder()
    SampledLinearGrads(linears(model), sink)  # installed, never given indices
    assert torch.equal(run(model, x, w), run(plain, x, w))
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    assert not sink.calls


def test_temporaries_are_capped() -> None:
    model, plain = mlp(), mlp()
    x, w = torch.randn(4, 7, 6), torch.randn(4, 7, 3)
    run(plain, x, w)
    sink = Recorder()
    sampled = SampledLinearGrads(linears(model), sink, temp_numel=3 * 28)  # T = 28 positions
    assert sampled.chunk_for(torch.empty(28, 8)) == 3
    assert sampled.chunk_for(torch.empty(10**9, 0)) == 1
    assert SampledLinearGrads({}, sink, chunk=5).chunk_for(torch.empty(28, 8)) == 5
    indices = every_module_indices(model, 0.5)
    sampled.set_indices(indices)
    run(model, x, w)
    for name, m in linears(plain).items():
        torch.testing.assert_close(sink.calls[name][0], m.weight.grad.reshape(-1)[indices[name]])


def test_inactive_is_bitwise_on_a_larger_layer() -> None:
    # Larger than the BLAS kernels' small-matrix paths, non-contiguous input.
    torch.manual_seed(3)
    m = nn.Linear(96, 200)
    plain = copy.deepcopy(m)
    SampledLinearGrads({"m": m}, Recorder())
    x = torch.randn(2, 300, 192)[..., ::2]
    w = torch.randn(2, 300, 200)
    assert torch.equal(run(m, x, w), run(plain, x, w))
    assert torch.equal(m.weight.grad, plain.weight.grad)
    assert torch.equal(m.bias.grad, plain.bias.grad)


def test_indices_in_force_are_those_at_backward() -> None:
    model = mlp()
    sink = Recorder()
    sampled = SampledLinearGrads(linears(model), sink)
    x = torch.randn(3, 6)
    loss = model(x).sum()  # built while inactive
    sampled.set_indices(every_module_indices(model, 0.2))
    loss.backward()
    assert all(m.weight.grad is None for m in linears(model).values())
    assert len(sink.calls) == 3

    loss = model(x).sum()  # built while active
    sampled.set_indices(None)
    loss.backward()
    assert all(m.weight.grad is not None for m in linears(model).values())
    assert len(sink.calls) == 3 and all(len(v) == 1 for v in sink.calls.values())


def test_empty_indices_give_empty_values() -> None:
    model = mlp()
    sink = Recorder()
    sampled = SampledLinearGrads(linears(model), sink)
    sampled.set_indices({n: torch.empty(0, dtype=torch.int64) for n in linears(model)})
    run(model, torch.randn(3, 6), torch.randn(3, 3))
    for name in linears(model):
        (values,) = sink.calls[name]
        assert values.shape == (0,) and values.dtype == torch.float32
        assert linears(model)[name].weight.grad is None


def test_module_used_twice_calls_sink_twice() -> None:
    torch.manual_seed(4)
    m = nn.Linear(4, 4)
    plain = copy.deepcopy(m)
    sink = Recorder()
    sampled = SampledLinearGrads({"m": m}, sink)
    idx = random_indices(16, 6)
    sampled.set_indices({"m": idx})
    x = torch.randn(5, 4)
    m(torch.tanh(m(x))).sum().backward()
    plain(torch.tanh(plain(x))).sum().backward()
    assert len(sink.calls["m"]) == 2
    torch.testing.assert_close(sum(sink.calls["m"]), plain.weight.grad.reshape(-1)[idx])


def test_frozen_weights_are_left_alone() -> None:
    model = mlp()
    first, middle, _ = linears(model).values()
    first.weight.requires_grad_(False)
    sink = Recorder()
    sampled = SampledLinearGrads(linears(model), sink)
    assert "forward" not in vars(first)
    assert sampled.names == ["2", "4"]
    indices = every_module_indices(model, 0.5)
    sampled.set_indices(indices)  # indices of the frozen module are accepted and ignored
    # Frozen after installing: the function sees it (needs_input_grad) and does no work.
    middle.weight.requires_grad_(False)
    run(model, torch.randn(3, 6), torch.randn(3, 3))
    assert list(sink.calls) == ["4"]
    assert first.weight.grad is None and middle.weight.grad is None
    assert first.bias.grad is not None


def test_remove_restores_the_class_forward() -> None:
    model = mlp()
    sampled = SampledLinearGrads(linears(model), Recorder())
    assert all("forward" in vars(m) for m in linears(model).values())
    sampled.remove()
    sampled.remove()  # idempotent
    for m in linears(model).values():
        assert "forward" not in vars(m)
        assert m.forward.__func__ is nn.Linear.forward
    again = SampledLinearGrads(linears(model), Recorder())  # can be installed again
    again.remove()


# --- 3. activation checkpointing and autocast ---------------------------------------------------


class Checkpointed(nn.Module):
    """The MLP run under non-reentrant activation checkpointing, counting its forwards."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.forwards = 0

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        return self.inner(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._body, x, use_reentrant=False)


def test_under_checkpoint_sink_called_once_per_module() -> None:
    model, plain = Checkpointed(mlp()), mlp()
    x, w = torch.randn(4, 6), torch.randn(4, 3)
    gx_plain = run(plain, x, w)
    sink = Recorder()
    sampled = SampledLinearGrads(linears(model.inner), sink)
    indices = every_module_indices(model.inner, 0.3)
    sampled.set_indices(indices)
    gx = run(model, x, w)
    assert model.forwards == 2  # the forward was recomputed
    torch.testing.assert_close(gx, gx_plain)
    for name, m in linears(model.inner).items():
        assert m.weight.grad is None
        assert len(sink.calls[name]) == 1, name
        ref = linears(plain)[name].weight.grad.reshape(-1)[indices[name]]
        torch.testing.assert_close(sink.calls[name][0], ref)

    sampled.set_indices(None)  # inactive under checkpointing: bitwise the plain gradients
    model.zero_grad(set_to_none=True)
    assert torch.equal(run(model, x, w), gx_plain)
    for p, q in zip(model.inner.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_under_autocast() -> None:
    model, plain = mlp(), mlp()
    x, w = torch.randn(4, 6), torch.randn(4, 3)
    sink = Recorder()
    sampled = SampledLinearGrads(linears(model), sink)

    def run_autocast(net: nn.Module) -> torch.Tensor:
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(xx)
        (y.float() * w).sum().backward()
        return xx.grad

    gx_plain = run_autocast(plain)
    assert torch.equal(run_autocast(model), gx_plain)  # inactive: bitwise
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert p.grad.dtype == torch.float32 and torch.equal(p.grad, q.grad)

    model.zero_grad(set_to_none=True)
    indices = every_module_indices(model, 0.3)
    sampled.set_indices(indices)
    assert torch.equal(run_autocast(model), gx_plain)
    for name, m in linears(model).items():
        assert m.weight.grad is None
        (values,) = sink.calls[name]
        assert values.dtype == torch.float32
        ref = linears(plain)[name].weight.grad.reshape(-1)[indices[name]]
        torch.testing.assert_close(values, ref, rtol=1e-2, atol=1e-2)  # bf16 dense vs fp32 sum


# --- 4. the tiny Aurora backbone ----------------------------------------------------------------


def test_tiny_aurora_backbone() -> None:
    model = build_backbone("tiny", seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-identity blocks (random init zeroes the res-post-norms)
        for p in model.backbone.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    batch = random_batch(model.config, B=1, H=16, W=32)
    mods = linears(model.backbone)
    assert {n.rsplit(".", 1)[-1] for n in mods} >= {"qkv", "proj", "fc1", "fc2"}

    def loss() -> torch.Tensor:
        return sum(v.pow(2).mean() for v in model(batch).surf_vars.values())

    loss().backward()
    dense = {n: m.weight.grad.clone() for n, m in mods.items()}
    others = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    sink = Recorder()
    sampled = SampledLinearGrads(mods, sink)
    indices = every_module_indices(model.backbone, 0.003)
    sampled.set_indices(indices)
    loss().backward()
    sampled.remove()

    for name, m in mods.items():
        assert m.weight.grad is None, name
        (values,) = sink.calls[name]
        want = dense[name].reshape(-1)[indices[name]]
        scale = dense[name].abs().max()
        torch.testing.assert_close(values, want, rtol=1e-4, atol=1e-5 * float(scale), msg=name)
    weights = {f"backbone.{n}.weight" for n in mods}
    for name, p in model.named_parameters():  # every other gradient as before
        if name not in weights and name in others:
            torch.testing.assert_close(p.grad, others[name], rtol=1e-4, atol=1e-7, msg=name)


# --- 5. bad input -------------------------------------------------------------------------------


def test_bad_indices_of_the_product() -> None:
    g, x = torch.randn(3, 2), torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        sampled_weight_grad(g, x, torch.tensor([0, 8]))
    with pytest.raises(ValueError, match=r"\[-1, 3\]"):
        sampled_weight_grad(g, x, torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="int64"):
        sampled_weight_grad(g, x, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="1-D"):
        sampled_weight_grad(g, x, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="same leading shape"):
        sampled_weight_grad(g, torch.randn(4, 4), torch.tensor([0]))
    with pytest.raises(ConfigError, match="chunk must be >= 1"):
        sampled_weight_grad(g, x, torch.tensor([0]), chunk=0)


def test_bad_indices_name_the_module() -> None:
    model = mlp()
    sampled = SampledLinearGrads(linears(model), Recorder())
    good = every_module_indices(model, 0.3)
    sampled.set_indices(good)

    with pytest.raises(KeyError, match="'2'"):
        sampled.set_indices({n: v for n, v in good.items() if n != "2"})
    with pytest.raises(KeyError, match="'typo'"):
        sampled.set_indices({**good, "typo": good["0"]})
    with pytest.raises(ValueError, match=r"'4'.*\[0, 15\)"):
        sampled.set_indices({**good, "4": torch.tensor([0, 15])})
    with pytest.raises(ValueError, match="'0'.*int64"):
        sampled.set_indices({**good, "0": good["0"].int()})
    with pytest.raises(ValueError, match="'0'.*strictly increasing"):
        sampled.set_indices({**good, "0": torch.tensor([3, 1])})
    with pytest.raises(ValueError, match="'0'.*strictly increasing"):
        sampled.set_indices({**good, "0": torch.tensor([1, 1])})
    with pytest.raises(ValueError, match="'0'.*on meta.*move them"):
        sampled.set_indices({**good, "0": torch.empty(0, dtype=torch.int64, device="meta")})

    sink = Recorder()  # a refused set_indices changed nothing: the good indices are in force
    sampled.sink = sink
    run(model, torch.randn(2, 6), torch.randn(2, 3))
    assert {n: v[0].numel() for n, v in sink.calls.items()} == {
        n: v.numel() for n, v in good.items()
    }


def test_bad_modules() -> None:
    with pytest.raises(TypeError, match="'conv'.*Conv1d"):
        SampledLinearGrads({"conv": nn.Conv1d(2, 2, 1)}, Recorder())  # type: ignore[dict-item]

    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    with pytest.raises(TypeError, match="'scaled'"):
        SampledLinearGrads({"scaled": Scaled(2, 2)}, Recorder())
    m = nn.Linear(2, 2)
    first = SampledLinearGrads({"m": m}, Recorder())
    with pytest.raises(ValueError, match="'m'.*installed twice"):
        SampledLinearGrads({"m": m}, Recorder())
    first.remove()
    with pytest.raises(ConfigError, match="temp_numel=0"):
        SampledLinearGrads({}, Recorder(), temp_numel=0)
