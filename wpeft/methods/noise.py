"""SFAS's random term U: one Uniform[0, 1) draw per entry, readable at any entries alone.

The paper's additive score F̂ + a·U (METHOD.md §3) reaches the global top-k mostly through large
draws: Fisher information of a backbone is so heavy-tailed that early in training nearly every
selected entry is one whose U is close to 1. A selection that drew U for every entry with a
sequential generator (``torch.rand``) would spend most of its time drawing numbers that can
never matter. So the draws of a tensor are defined in two parts, at exceedance fraction c:

* **Large draws.** The set Z of entries with U >= 1 − c is a Bernoulli(c) process over the flat
  index (independent geometric gaps), drawn with its values U = (1 − c) + c·V, V ~ U[0, 1), for
  every tensor of a step at once (:meth:`TensorNoise.draw_all`: one process over the tensors
  laid end to end, from a CPU generator seeded by :func:`noise_seed` ``(seed, step, -1)``):
  about c·n numbers per tensor, found without touching the other n entries.
* **Every other entry** j: U_j = fl32(1 − c) · h(j), with h a counter-based hash (SplitMix64's
  finaliser of the same seed and j) to 24-bit uniforms in [0, 1). Any entry's draw is computed
  from its position alone: a candidate, a shard, a chunk.

So every U_j is Uniform[0, 1) (a c : 1 − c mixture of the two ranges) and the U_j are independent,
as with ``torch.rand``, but (i) the entries whose draw can lift them into the top-k are known
up front and (ii) every draw outside Z is at most :attr:`TensorNoise.ceiling`, a bound that lets
a selection skip entries without drawing them. The numbers do not depend on the device (Z comes
from the CPU generator; the hash is integer arithmetic), on sharding or on bucketing.

SFAS uses c = :func:`exceedance_fraction` ``(k, N)`` = min(1, 2k/N): Z holds about twice the
entries selected.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "EXCEEDANCE_PER_SELECTED",
    "TensorNoise",
    "draws_at",
    "draws_outside_z",
    "exceedance_fraction",
    "hash_uniform",
    "noise_seed",
    "z_on_one_axis",
]

#: |Z| over k: the large draws number about this many times the entries selected.
EXCEEDANCE_PER_SELECTED = 2

_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # SplitMix64's constants as signed int64
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_BELOW_ONE = 1.0 - 2.0**-24  # the largest float32 below 1
_CHUNK = 1 << 20
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def noise_seed(seed: int, step: int, index: int) -> int:
    """A well-mixed 63-bit key for the draws of tensor ``index`` at ``step``.

    Depends only on its arguments, never on the global RNG, so every data-parallel rank that
    uses the same ``seed`` draws the same noise.
    """
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (step & _MASK64))
    h = _splitmix64(h ^ (index & _MASK64))
    return h & ((1 << 63) - 1)


def exceedance_fraction(k: int, total: int) -> float:
    """c = min(1, 2k/N) for a top-k of ``k`` out of ``total`` entries (both >= 1)."""
    if not 1 <= k <= total:
        raise ValueError(f"k={k} must lie in [1, total={total}].")
    return min(1.0, EXCEEDANCE_PER_SELECTED * k / total)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 ``z`` (torch's ``>>`` is arithmetic)."""
    return z.bitwise_right_shift(bits).bitwise_and_((1 << (64 - bits)) - 1)


def hash_uniform(positions: torch.Tensor, key: int | torch.Tensor) -> torch.Tensor:
    """h(j): 24-bit uniforms in [0, 1) from int64 ``positions`` ``(p,)`` and a 63-bit ``key``
    (one for all, or ``(p,)`` int64, one per position).

    SplitMix64's output function of ``key + (j + 1)·golden``, top 24 bits; int64 products wrap
    as unsigned ones do, on CPU and CUDA alike. Returns ``(p,)`` float32.
    """
    z = (positions + 1).mul_(_GOLDEN).add_(key)
    z.bitwise_xor_(_shift_right(z, 30)).mul_(_MIX1)
    z.bitwise_xor_(_shift_right(z, 27)).mul_(_MIX2)
    z.bitwise_xor_(_shift_right(z, 31))
    return _shift_right(z, 40).to(torch.float32).mul_(2.0**-24)


def draws_outside_z(
    positions: torch.Tensor, key: int | torch.Tensor, ceiling: float | torch.Tensor
) -> torch.Tensor:
    """U at flat ``positions`` ``(p,)`` int64 known to lie outside Z: fl32(1 − c)·h(j), with one
    ``key`` and ``ceiling`` for all or ``(p,)`` of each (one per position) -> ``(p,)`` float32."""
    return hash_uniform(positions, key).mul_(ceiling)


def _bernoulli_process(
    total: int, fraction: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A Bernoulli(c) process over ``total`` entries and one U[0, 1) per point, from one uniform
    per point: ``(m,)`` int64 strictly increasing positions and ``(m,)`` float64 values.

    With E ~ Exp(λ), λ = −ln(1 − c) (from the uniform), floor(E) + 1 is a geometric gap
    (P(gap > j) = (1 − c)^j) and, by the exponential's lack of memory, the fraction f = E −
    floor(E) is independent of it with CDF (1 − e^(−λf)) / (1 − e^(−λ)): that CDF at f is the
    point's U[0, 1) value. Chunks of gaps are drawn until the walk passes the end.
    """
    rate = -math.log1p(-fraction)
    scale = 1.0 / math.expm1(-rate)
    positions, values, last = [], [], -1
    expected = total * fraction
    while last < total - 1:
        size = math.ceil(expected + 4.0 * math.sqrt(expected) + 16)
        e = torch.rand(size, generator=gen, dtype=torch.float64).neg_().log1p_().div_(-rate)
        whole = e.floor()
        values.append(e.sub_(whole).mul_(-rate).expm1_().mul_(scale))  # the CDF at f
        pos = whole.add_(1.0).cumsum_(0).add_(last).to(torch.int64)
        positions.append(pos)
        last = int(pos[-1])
        expected = max(0.0, (total - 1 - last) * fraction)
    pos = positions[0] if len(positions) == 1 else torch.cat(positions)
    m = int(torch.searchsorted(pos, total))
    val = values[0] if len(values) == 1 else torch.cat(values)
    return pos[:m], val[:m]


@dataclass(frozen=True)
class TensorNoise:
    """The draws U of one tensor at one step (see the module docstring).

    Attributes:
        key: The 63-bit seed of the tensor's draws (``noise_seed(seed, step, index)``).
        numel: Entries n of the full tensor.
        fraction: Exceedance fraction c in (0, 1].
        positions: ``(m,)`` int64, strictly increasing: Z, the entries with a large draw.
        values: ``(m,)`` float32: U at ``positions``, in [ceiling, 1).
        ceiling: fl32(1 − c): every draw outside Z is at most this (0 when c = 1).
    """

    key: int
    numel: int
    fraction: float
    positions: torch.Tensor
    values: torch.Tensor
    ceiling: float

    @classmethod
    def draw_all(
        cls,
        seed: int,
        step: int,
        numels: Sequence[int],
        fraction: float,
        device: torch.device | str = "cpu",
    ) -> list[TensorNoise]:
        """Draw Z and its values for every tensor at ``step`` at once: tensor ``i`` has
        ``numels[i]`` entries and hashes its other draws with ``noise_seed(seed, step, i)``.

        Z is one Bernoulli(c) process over the tensors' entries laid end to end (geometric gaps
        from one CPU generator seeded by ``noise_seed(seed, step, -1)``), cut at the tensors'
        bounds: each tensor's part is a Bernoulli(c) process of its own, independent of the
        others', and the whole costs a few operations however many tensors there are.
        """
        return cls.draw_all_on_one_axis(seed, step, numels, fraction, device)[0]

    @classmethod
    def draw_all_on_one_axis(
        cls,
        seed: int,
        step: int,
        numels: Sequence[int],
        fraction: float,
        device: torch.device | str = "cpu",
    ) -> tuple[list[TensorNoise], torch.Tensor]:
        """:meth:`draw_all`, and Z of the tensors laid end to end: ``(Σ|Z|,)`` int64 strictly
        increasing positions on ``device`` (:func:`z_on_one_axis` of the tensors, made as they
        are drawn)."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}.")
        sizes = [int(n) for n in numels]
        if any(n < 0 for n in sizes):
            raise ValueError(f"numels must be >= 0, got {sizes}.")
        total = sum(sizes)
        gen = torch.Generator().manual_seed(noise_seed(seed, step, -1))
        if fraction >= 1.0 or total == 0:
            positions = torch.arange(total, dtype=torch.int64)
            v = torch.rand(total, generator=gen, dtype=torch.float64)
        else:
            positions, v = _bernoulli_process(total, fraction, gen)
        values = v.mul_(fraction).add_(1.0 - fraction).to(torch.float32).clamp_(max=_BELOW_ONE)
        ceiling = float(torch.tensor(1.0 - fraction, dtype=torch.float32))
        # each tensor's part of Z, shifted to its own flat indices
        starts = torch.tensor([0, *sizes], dtype=torch.int64).cumsum_(0)
        cuts = torch.searchsorted(positions, starts).tolist()
        counts = [b - a for a, b in itertools.pairwise(cuts)]
        local = positions - starts[:-1].repeat_interleave(torch.tensor(counts, dtype=torch.int64))
        local, values = local.to(device), values.to(device)
        noises = [
            cls(noise_seed(seed, step, i), n, fraction, pos, val, ceiling)
            for i, (n, pos, val) in enumerate(
                zip(sizes, local.split(counts), values.split(counts))
            )
        ]
        return noises, positions.to(device)

    def outside_z(self, positions: torch.Tensor) -> torch.Tensor:
        """U at flat ``positions`` ``(p,)`` int64 known to lie outside Z (the hashed draws
        alone, no lookup in Z) -> ``(p,)`` float32."""
        return draws_outside_z(positions, self.key, self.ceiling)

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """U at flat ``positions`` ``(p,)`` int64 in [0, numel), any order -> ``(p,)`` float32."""
        return draws_at([self], positions)

    def span(self, start: int, length: int) -> torch.Tensor:
        """U over flat entries ``[start, start + length)`` -> ``(length,)`` float32."""
        device = self.positions.device
        out = torch.empty(length, dtype=torch.float32, device=device)
        for lo in range(0, length, _CHUNK):
            hi = min(length, lo + _CHUNK)
            pos = torch.arange(start + lo, start + hi, dtype=torch.int64, device=device)
            out[lo:hi] = self.outside_z(pos)
        a = int(torch.searchsorted(self.positions, start))
        b = int(torch.searchsorted(self.positions, start + length))
        out[self.positions[a:b] - start] = self.values[a:b]
        return out


def z_on_one_axis(noises: Sequence[TensorNoise]) -> tuple[torch.Tensor, torch.Tensor]:
    """Z of several tensors laid end to end: ``(shift, positions)``, ``shift`` ``(T,)`` int64
    the entries of the tensors before each, ``positions`` ``(Σ|Z|,)`` int64 each tensor's Z
    shifted by its ``shift`` (strictly increasing), on the first tensor's device."""
    device = noises[0].positions.device
    shift = torch.tensor([0] + [n.numel for n in noises[:-1]], device=device).cumsum_(0)
    sizes = torch.tensor([n.positions.numel() for n in noises], device=device)
    positions = torch.cat([n.positions for n in noises]).add_(shift.repeat_interleave(sizes))
    return shift, positions


def draws_at(
    noises: Sequence[TensorNoise], positions: torch.Tensor, which: torch.Tensor | None = None
) -> torch.Tensor:
    """U of several tensors in one pass: entry j is flat index ``positions[j]`` of tensor
    ``noises[which[j]]`` (``(p,)`` int64 both, any order; ``which`` None: all of ``noises[0]``)
    -> ``(p,)`` float32.

    The hashed draws of every position at once (each with its tensor's key), then Z's values
    where a position lies in its tensor's Z: the numbers :meth:`TensorNoise.at` gives tensor by
    tensor.
    """
    device = noises[0].positions.device
    positions = positions.to(device)
    if len(noises) == 1 and which is None:  # one tensor: its key and Z as they are
        n = noises[0]
        out = draws_outside_z(positions, n.key, n.ceiling)
        z_pos, z_val, where = n.positions, n.values, positions
    else:
        which = (
            torch.zeros_like(positions) if which is None
            else which.to(device=device, dtype=torch.int64)
        )
        if positions.shape != which.shape:
            raise ValueError(
                f"positions {tuple(positions.shape)} and which {tuple(which.shape)} must match."
            )
        key = torch.tensor([n.key for n in noises], dtype=torch.int64, device=device)[which]
        ceiling = torch.tensor([n.ceiling for n in noises], dtype=torch.float32, device=device)
        out = draws_outside_z(positions, key, ceiling[which])
        shift, z_pos = z_on_one_axis(noises)
        z_val = torch.cat([n.values for n in noises])
        where = positions + shift[which]
    if z_pos.numel() and positions.numel():
        idx = torch.searchsorted(z_pos, where).clamp_(max=z_pos.numel() - 1)
        hit = z_pos[idx] == where
        out[hit] = z_val[idx[hit]]
    return out
