"""SFAS's draws U (``wpeft.methods.noise``): uniform, independent of how they are read."""

from __future__ import annotations

import math

import pytest
import torch

from wpeft.methods.noise import (
    TensorNoise,
    draws_at,
    exceedance_fraction,
    hash_uniform,
    noise_seed,
)


def test_draws_are_uniform_with_the_large_ones_in_z() -> None:
    """U over 2M entries: mean 1/2, variance 1/12, flat 20-bin histogram; exactly the entries of
    Z lie at or above 1 − c and about c·n of them; the rest stay at or below the ceiling."""
    n, c = 2_000_000, 0.004
    noise = TensorNoise.draw_all(seed=1, step=2, numels=[n], fraction=c)[0]
    u = noise.span(0, n)
    assert u.dtype == torch.float32 and u.shape == (n,)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.double().mean()) - 0.5) < 2e-3
    assert abs(float(u.double().var()) * 12 - 1.0) < 5e-3
    counts = torch.histc(u, bins=20, min=0.0, max=1.0)
    expected = n / 20
    assert float((counts - expected).abs().max()) < 5 * math.sqrt(expected)
    z = noise.positions
    assert bool((z[1:] > z[:-1]).all()) and int(z[0]) >= 0 and int(z[-1]) < n
    assert abs(z.numel() - c * n) < 5 * math.sqrt(c * n)  # Binomial(n, c)
    outside = torch.ones(n, dtype=torch.bool)
    outside[z] = False
    assert float(u[outside].max()) <= noise.ceiling == float(torch.tensor(1 - c))
    assert float(u[z].min()) >= noise.ceiling
    assert torch.equal(u[z], noise.values)



def test_gaps_of_z_are_geometric_and_its_values_uniform_whatever_the_gap() -> None:
    """Z over 4M entries at c = 0.003 (about 12,000 points): the gaps between its points have
    the geometric mean 1/c and tail P(gap > j) = (1 − c)^j; the values V = (U − (1 − c)) / c
    are uniform on [0, 1) and uncorrelated with the gap that led to their point (both come
    from one uniform per point), also within the short and the long gaps."""
    n, c = 4_000_000, 0.003
    z = TensorNoise.draw_all(5, 9, [n], c)[0]
    gaps = torch.diff(z.positions).double()
    m = gaps.numel()
    assert m > 11_000
    sd_mean = math.sqrt(1 - c) / c / math.sqrt(m)
    assert abs(float(gaps.mean()) - 1 / c) < 5 * sd_mean
    for j in (1, 100, 333, 1000):
        p = (1 - c) ** j
        assert abs(float((gaps > j).double().mean()) - p) < 5 * math.sqrt(p * (1 - p) / m) + 1e-3
    v = (z.values.double() - (1 - c)) / c
    assert float(v.min()) >= -1e-4 and float(v.max()) < 1 + 1e-4  # float32 rounding of U
    assert abs(float(v.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / m)
    after = v[1:]  # the value at the end of each gap
    corr = float(torch.corrcoef(torch.stack([after, gaps]))[0, 1])
    assert abs(corr) < 5 / math.sqrt(m)
    for part in (after[gaps <= 1 / c], after[gaps > 1 / c]):
        assert abs(float(part.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / part.numel())

def test_any_entry_reads_the_same_number() -> None:
    """``at`` (candidates, any order, repeats) and ``span`` (shards, chunks) give the full
    tensor's numbers; the same arguments draw the same Z, another step or tensor other ones."""
    n, c = 300_001, 0.01
    noise = TensorNoise.draw_all(7, 0, [n], c)[0]
    full = noise.span(0, n)
    gen = torch.Generator().manual_seed(0)
    pos = torch.cat([torch.randint(n, (5000,), generator=gen), noise.positions[:50], torch.tensor([0, n - 1])])
    assert torch.equal(noise.at(pos), full[pos])
    for start, length in [(0, 1), (12_345, 99_999), (n - 7, 7), (5, 0)]:
        assert torch.equal(noise.span(start, length), full[start : start + length])
    again = TensorNoise.draw_all(7, 0, [n], c)[0]
    assert torch.equal(again.positions, noise.positions) and torch.equal(again.values, noise.values)
    for other in (TensorNoise.draw_all(7, 1, [n], c)[0], TensorNoise.draw_all(7, 0, [n, n], c)[1]):
        assert not torch.equal(other.span(0, 1000), full[:1000])


def test_draws_of_many_tensors_read_at_once() -> None:
    """``draws_at`` over several tensors (entries interleaved, Z hits and misses, an empty
    tensor) gives each tensor's own numbers; a per-position key equals the scalar key."""
    sizes, c = [1000, 0, 37, 5000], 0.05
    noises = TensorNoise.draw_all(3, 4, sizes, c)
    gen = torch.Generator().manual_seed(1)
    which = torch.tensor([0, 2, 3] * 200)[torch.randperm(600, generator=gen)]
    pos = torch.stack([
        torch.randint(sizes[int(t)], (), generator=gen) for t in which
    ])
    which[:3] = torch.tensor([0, 3, 3])  # three entries in Z (tensor 2's may be empty)
    pos[:3] = torch.stack([noises[0].positions[0], noises[3].positions[0], noises[3].positions[-1]])
    got = draws_at(noises, pos, which)
    want = torch.stack([noises[int(t)].at(p.reshape(1))[0] for t, p in zip(which, pos)])
    assert torch.equal(got, want)
    assert torch.equal(draws_at(noises[3:], pos[which == 3]), noises[3].at(pos[which == 3]))
    key = torch.full((50,), noise_seed(3, 4, 0))
    assert torch.equal(hash_uniform(torch.arange(50), key), hash_uniform(torch.arange(50), int(key[0])))
    with pytest.raises(ValueError, match="positions \\(5,\\) and which \\(4,\\) must match"):
        draws_at(noises, torch.zeros(5, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))


def test_tensors_drawn_together_are_independent_bernoulli_processes() -> None:
    """Z of many tensors drawn at once: each tensor's part lies in its own range, sorted, about
    c·n strong and stepping with the tensor's own key (its hashed draws); the tensors laid end
    to end give the Z of one tensor as long as them all (one process, cut at the bounds)."""
    sizes, c = [50_000, 1, 0, 120_000, 7, 80_000], 0.01
    noises = TensorNoise.draw_all(11, 3, sizes, c)
    assert [z.numel for z in noises] == sizes
    for i, (z, n) in enumerate(zip(noises, sizes, strict=True)):
        assert z.key == noise_seed(11, 3, i)
        assert z.positions.numel() == z.values.numel()
        if z.positions.numel():
            assert bool((z.positions[1:] > z.positions[:-1]).all())
            assert int(z.positions[0]) >= 0 and int(z.positions[-1]) < n
        if n >= 50_000:
            assert abs(z.positions.numel() - c * n) < 5 * math.sqrt(c * n)
    (whole,) = TensorNoise.draw_all(11, 3, [sum(sizes)], c)
    shift = torch.tensor([0, *sizes[:-1]]).cumsum(0)
    assert torch.equal(torch.cat([z.positions + s for z, s in zip(noises, shift)]), whole.positions)
    assert torch.equal(torch.cat([z.values for z in noises]), whole.values)


def test_hash_is_24_bit_and_keyed() -> None:
    pos = torch.arange(100_000)
    h = hash_uniform(pos, noise_seed(0, 0, 0))
    scaled = h.double() * 2**24
    assert torch.equal(scaled, scaled.round()) and float(h.min()) >= 0 and float(h.max()) < 1
    assert not torch.equal(h, hash_uniform(pos, noise_seed(0, 0, 1)))
    assert torch.unique(h).numel() > 99_000  # no short cycles


def test_full_fraction_empty_tensor_and_bad_input() -> None:
    every = TensorNoise.draw_all(0, 0, [1000], 1.0)[0]
    assert torch.equal(every.positions, torch.arange(1000)) and every.ceiling == 0.0
    assert torch.equal(every.span(0, 1000), every.values)
    empty = TensorNoise.draw_all(0, 0, [0], 0.5)[0]
    assert empty.positions.numel() == 0 and empty.span(0, 0).numel() == 0
    assert exceedance_fraction(3, 600) == pytest.approx(0.01)
    assert exceedance_fraction(400, 600) == 1.0
    with pytest.raises(ValueError, match=r"k=0 must lie in \[1, total=600\]"):
        exceedance_fraction(0, 600)
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\]"):
        TensorNoise.draw_all(0, 0, [10], 0.0)
    with pytest.raises(ValueError, match=r"numels must be >= 0"):
        TensorNoise.draw_all(0, 0, [10, -1], 0.5)
