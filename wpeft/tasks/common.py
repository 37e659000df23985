"""What the tasks share: split fractions, time-block splits, batching, the backbone's statistics,
installing new variables into Aurora and naming scores.

Each task (:mod:`~wpeft.tasks.downscaling`, :mod:`~wpeft.tasks.postprocessing`,
:mod:`~wpeft.tasks.precipitation`) holds its data in memory as :class:`~wpeft.data.batch.Fields`,
splits its time-ordered samples into contiguous train / val / test blocks that share no time step
(:func:`split_by_time`), draws index chunks (:func:`index_batches`) and builds ``aurora.Batch``
inputs (:func:`make_batch`). Variables the backbone never had get a new embedding kernel and
decoder head (:func:`add_variable`), grouped in a :class:`TaskHead`, and normalisation statistics
(:func:`register_norm`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import xarray as xr
from aurora import Batch, Metadata
from torch import nn

from wpeft.backbones.aurora_adapter import WpeftAurora, norm_key
from wpeft.data.batch import check_grid, wb2_name
from wpeft.data.schema import VARIABLES, check_time_axis, describe_steps, regular_step
from wpeft.data.source import split_by_period
from wpeft.data.world import WorldConfig
from wpeft.errors import ConfigError, DataError
from wpeft.tasks.base import Split, TaskConfig

__all__ = [
    "ATMOS_VARS",
    "SIX_HOURS",
    "SPLITS",
    "STATIC_VARS",
    "SURF_VARS",
    "ConstantInputs",
    "TaskHead",
    "add_variable",
    "backbone_inputs",
    "backbone_stats",
    "channel_std",
    "check_fractions",
    "check_patch_grid",
    "check_split",
    "coerce_world",
    "copy_task_variables",
    "index_batches",
    "level_key",
    "make_batch",
    "missing_inputs",
    "per_level_scores",
    "refuse_fixed_grid",
    "register_norm",
    "require_stats",
    "split_by_time",
    "split_samples",
    "time_step",
    "var_attrs",
]

#: The three splits, in time order.
SPLITS: tuple[Split, ...] = ("train", "val", "test")
#: The embedded world's variables, as Aurora short names (the backbone's default set).
SURF_VARS: tuple[str, ...] = ("2t", "10u", "10v", "msl")
ATMOS_VARS: tuple[str, ...] = ("z", "u", "v", "t", "q")
STATIC_VARS: tuple[str, ...] = ("lsm", "z", "slt")
#: The world's output interval and the downscaling lag.
SIX_HOURS = np.timedelta64(6, "h")


# --------------------------------------------------------------------------------------------
# task settings
# --------------------------------------------------------------------------------------------


def coerce_world(value: WorldConfig | Mapping[str, Any]) -> WorldConfig:
    """A :class:`WorldConfig` from itself or from its ``to_dict()`` (configs read from JSON)."""
    if isinstance(value, WorldConfig):
        return value
    if isinstance(value, Mapping):
        return WorldConfig.from_dict(dict(value))
    raise ConfigError(f"world={value!r} must be a WorldConfig or a dict of its fields.")


def check_fractions(fractions: Sequence[float], name: str = "split_fractions") -> tuple[float, ...]:
    """Three positive train/val/test fractions summing to 1, as floats, or :class:`ConfigError`."""
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{name}={fractions!r} must be three numbers (train, val, test)."
        ) from None
    if len(values) != 3 or any(not math.isfinite(f) or f <= 0 for f in values):
        raise ConfigError(
            f"{name}={fractions!r} must be three positive numbers (train, val, test)."
        )
    if abs(sum(values) - 1.0) > 1e-6:
        raise ConfigError(f"{name}={fractions!r} must sum to 1 (they sum to {sum(values):.6g}).")
    return values


# --------------------------------------------------------------------------------------------
# time axes, splits and batches
# --------------------------------------------------------------------------------------------


def time_step(times: np.ndarray) -> np.timedelta64:
    """The constant step of a strictly increasing datetime64 axis.

    The tasks hold their data in memory and split it into contiguous time blocks, so a gap is
    refused (naming it) rather than skipped as :class:`~wpeft.data.loader.WindowDataset` does.
    """
    times = np.asarray(times)
    check_time_axis(times)
    step, breaks = regular_step(times)
    if step is None:
        raise DataError("The data has a single time step; the task needs at least two.")
    if breaks.size:
        raise DataError(
            f"The data's time axis has {describe_steps(times, breaks, step)}; this task needs a "
            "regular one: select a stretch without gaps (e.g. open_era5(..., time=slice(...)))."
        )
    return step


def check_split(split: str) -> Split:
    """``split`` if it is one of :data:`SPLITS`, else :class:`ConfigError`."""
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} must be one of {SPLITS}.")
    return split  # type: ignore[return-value]


def split_by_time(
    starts: np.ndarray, ends: np.ndarray, fractions: Sequence[float], what: str = "samples"
) -> dict[Split, np.ndarray]:
    """Contiguous train / val / test blocks of time-ordered samples that share no time step.

    Args:
        starts, ends: ``(N,)`` first and last time (step index or datetime64) each sample
            touches (inputs and targets), samples ordered by time.
        fractions: Train, val, test fractions of the N samples (block boundaries are rounded).
        what: Name of the samples, for the error message.

    Returns:
        ``{split: positions}`` with int64 positions into the N samples. The first samples of a
        block whose window reaches back into the previous block's kept samples are dropped.

    Raises:
        DataError: a split would be empty (too few samples for the fractions and windows).
    """
    starts, ends = np.asarray(starts), np.asarray(ends)
    n = len(starts)
    f = check_fractions(fractions)
    cuts = [0, round(n * f[0]), round(n * (f[0] + f[1])), n]
    out: dict[Split, np.ndarray] = {}
    last_end = None
    for i, name in enumerate(SPLITS):
        block = np.arange(cuts[i], cuts[i + 1])
        if last_end is not None:
            block = block[starts[block] > last_end]
        if block.size == 0:
            raise DataError(
                f"The {name} split is empty: {n} {what} are too few for split_fractions={f} "
                "once the samples that overlap a neighbouring split in time are dropped. Use "
                "more data (e.g. a longer world: WorldConfig(days=...)) or other fractions."
            )
        out[name] = block.astype(np.int64)
        last_end = ends[block].max()
    return out


def split_samples(
    starts: np.ndarray, ends: np.ndarray, config: TaskConfig, what: str = "samples"
) -> dict[Split, np.ndarray]:
    """The task's splits: by the periods of ``config.data`` when it has them (datetime64
    ``starts`` / ``ends`` required then), else contiguous blocks by ``config.split_fractions``."""
    source = config.data
    if source is not None and source.periods is not None:
        return split_by_period(starts, ends, source.periods, what)  # type: ignore[return-value]
    return split_by_time(starts, ends, config.split_fractions, what)


def index_batches(
    indices: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    shard: tuple[int, int] | None = None,
) -> Iterator[np.ndarray]:
    """Chunks of ``indices`` of at most ``batch_size`` (the last one may be smaller).

    With ``shard=(rank, world_size)`` each chunk is the global batch's contiguous share of this
    rank (the first ``B / world_size`` samples to rank 0, and so on), so a rank reads
    only its own samples; the global batch must then divide evenly.
    """
    if (
        not isinstance(batch_size, (int, np.integer))
        or isinstance(batch_size, bool)
        or batch_size < 1
    ):
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer.")
    order = np.asarray(indices)
    if shuffle:
        order = order[np.random.default_rng(seed).permutation(len(order))]
    for start in range(0, len(order), int(batch_size)):
        chunk = order[start : start + int(batch_size)]
        if shard is None:
            yield chunk
            continue
        rank, world = shard
        if len(chunk) % world:
            raise ConfigError(
                f"Global batch {len(chunk)} is not divisible by world size {world}; choose a "
                "batch_size that is a multiple of the number of processes."
            )
        per = len(chunk) // world
        yield chunk[rank * per : (rank + 1) * per]


def make_batch(
    surf: dict[str, torch.Tensor],
    atmos: dict[str, torch.Tensor],
    static: dict[str, torch.Tensor],
    lat: torch.Tensor,
    lon: torch.Tensor,
    levels: Sequence[int],
    times: np.ndarray,
) -> Batch:
    """An ``aurora.Batch``: surface ``(B, T, H, W)``, atmos ``(B, T, C, H, W)``, static ``(H, W)``;
    ``times`` ``(B,)`` datetime64 of the last history step."""
    return Batch(
        surf_vars=surf,
        static_vars=static,
        atmos_vars=atmos,
        metadata=Metadata(
            lat=lat,
            lon=lon,
            time=tuple(pd.Timestamp(t).to_pydatetime() for t in np.asarray(times)),
            atmos_levels=tuple(int(x) for x in levels),
        ),
    )


# --------------------------------------------------------------------------------------------
# the backbone's normalisation statistics
# --------------------------------------------------------------------------------------------


def backbone_stats(
    model: WpeftAurora, name: str, level: int | None = None
) -> tuple[float, float] | None:
    """Mean and std the backbone normalises an Aurora variable with, or None if it has none.

    A backbone trained by wpeft carries its own ``norm_mean``/``norm_std``; a backbone without
    them (a released Aurora checkpoint) uses Aurora's ERA5 statistics.
    """
    return model.normalisation_stats(name, level)


def require_stats(model: WpeftAurora, name: str, level: int | None = None) -> tuple[float, float]:
    """:func:`backbone_stats`, or :class:`ConfigError` naming the missing key."""
    stats = backbone_stats(model, name, level)
    if stats is None:
        raise ConfigError(
            f"The backbone has no normalisation statistics for {norm_key(name, level)!r}; "
            "use a backbone trained on these variables and levels."
        )
    return stats


def register_norm(model: WpeftAurora, key: str, mean: float, std: float) -> None:
    """Make ``model`` normalise ``key`` (``"tp_12h"``, ``"t_logscale_850"``) with ``mean``/``std``.

    Aurora's own tables get the identity for keys they lack (as :class:`WpeftAurora` does), so
    ours is the only normalisation applied (``model.register_norm``).
    """
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise DataError(f"Statistics for {key!r} must be finite with std > 0; got {mean}, {std}.")
    model.register_norm(key, float(mean), float(std))


def backbone_inputs(model: WpeftAurora) -> dict[str, tuple[str, ...]]:
    """The WB2 names of the variables the backbone embeds, by kind:
    ``{"surface": (...), "atmos": (...), "static": (...)}`` (pseudo-variables excluded)."""
    c = model.config
    return {
        "surface": tuple(wb2_name(v, "surface") for v in c.surf_vars),
        "atmos": tuple(wb2_name(v, "atmos") for v in c.atmos_vars),
        "static": tuple(wb2_name(v, "static") for v in c.static_vars),
    }


def missing_inputs(
    model: WpeftAurora, surf: Sequence[str], atmos: Sequence[str]
) -> list[str]:
    """Those of the surface and atmospheric variables ``surf`` / ``atmos`` (Aurora short names)
    that the backbone does not read: neither its own (``config``) nor a task's
    (``model.task_variables()``)."""
    c = model.config
    added = model.task_variables()
    reads_surf = {*c.surf_vars, *(n for kind, n in added if kind == "surface")}
    reads_atmos = {*c.atmos_vars, *(n for kind, n in added if kind == "atmos")}
    return [v for v in surf if v not in reads_surf] + [v for v in atmos if v not in reads_atmos]


def refuse_fixed_grid(model: WpeftAurora, task: str) -> None:
    """:class:`ConfigError` when a task's real-store path meets a backbone that embeds a fixed
    grid, levels and channels (``model.fixed_grid()`` not None: Prithvi-WxC)."""
    grid = model.fixed_grid()
    if grid is not None:
        raise ConfigError(
            f"{task} on a real store (data=...) needs a backbone that reads any grid and levels; "
            f"backbone {model.config.name!r} embeds a fixed {grid[0]} x {grid[1]} grid, levels "
            "and channels. Use an Aurora backbone (e.g. 'tiny') or the synthetic world (no data)."
        )


class ConstantInputs:
    """Inputs a real store lacks, fed as constant fields at the backbone's normalisation mean.

    Only built when the user opted in (``data.fill_missing``); the names are recorded in the
    run. In normalised units such a field is zero: the backbone gets "no information", not a
    climatology of the region.

    Args:
        model: The backbone (its statistics give the constants).
        lacking: WB2 names of the missing inputs (surface, atmospheric or static).
        levels: Pressure levels of the batch's atmospheric variables.
    """

    def __init__(self, model: WpeftAurora, lacking: Sequence[str], levels: Sequence[int]) -> None:
        self.names = tuple(lacking)
        self.levels = tuple(int(x) for x in levels)
        self.surf: dict[str, float] = {}
        self.atmos: dict[str, list[float]] = {}
        self.static: dict[str, float] = {}
        for name in self.names:
            s = VARIABLES[name]
            if s.kind == "surface":
                self.surf[s.aurora] = require_stats(model, s.aurora)[0]
            elif s.kind == "static":
                self.static[s.aurora] = require_stats(model, s.aurora)[0]
            else:
                self.atmos[s.aurora] = [require_stats(model, s.aurora, lv)[0] for lv in self.levels]

    def complete(
        self,
        surf: dict[str, torch.Tensor],
        atmos: dict[str, torch.Tensor],
        static: dict[str, torch.Tensor],
        leading: Sequence[int],
        grid: tuple[int, int],
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``surf``, ``atmos`` and ``static`` with the missing variables added: surface
        ``(*leading, H, W)``, atmos ``(*leading, C, H, W)``, static ``(H, W)``."""
        H, W = grid
        surf = dict(surf) | {
            v: torch.full((*leading, H, W), m, dtype=torch.float32) for v, m in self.surf.items()
        }
        atmos = dict(atmos) | {
            v: torch.tensor(ms, dtype=torch.float32)
            .view(*([1] * len(leading)), -1, 1, 1)
            .expand(*leading, len(ms), H, W)
            .clone()
            for v, ms in self.atmos.items()
        }
        static = dict(static) | {
            v: torch.full((H, W), m, dtype=torch.float32) for v, m in self.static.items()
        }
        return surf, atmos, static


def channel_std(stds: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-level stds as a ``(C, 1, 1)`` tensor on ``like``'s device and dtype."""
    return torch.tensor(list(stds), dtype=like.dtype, device=like.device).view(-1, 1, 1)


# --------------------------------------------------------------------------------------------
# new variables in the backbone (a task's head)
# --------------------------------------------------------------------------------------------


class TaskHead(nn.Module):
    """The parameters a task installs into the backbone, held by reference.

    The same ``Parameter``/module objects live in the backbone's encoder (``surf_token_embeds``,
    ``atmos_token_embeds``) and decoder (``surf_heads``, ``atmos_heads``), where Aurora uses them
    by variable name; this module only groups them so a method can treat them as the ``head``.

    Attributes:
        surf_embeds / atmos_embeds: New patch-embedding kernels ``(D, 1, T, P, P)`` by name.
        surf_heads / atmos_heads: New ``LinearPatchReconstruction`` decoder heads by name.
    """

    def __init__(self) -> None:
        super().__init__()
        self.surf_embeds = nn.ParameterDict()
        self.atmos_embeds = nn.ParameterDict()
        self.surf_heads = nn.ModuleDict()
        self.atmos_heads = nn.ModuleDict()

    @property
    def variables(self) -> tuple[str, ...]:
        """Names of the installed variables (surface first)."""
        return tuple(self.surf_embeds.keys()) + tuple(self.atmos_embeds.keys())


def add_variable(
    model: WpeftAurora,
    head: TaskHead,
    name: str,
    kind: Literal["surface", "atmos"],
    *,
    embed_init: Literal["zeros", "aurora"] = "aurora",
    head_init: Literal["zeros", "aurora"] = "aurora",
) -> None:
    """Give ``model`` a new variable ``name``: an embedding kernel and a decoder head
    (:meth:`~wpeft.backbones.aurora_adapter.WpeftAurora.add_task_variable`), referenced from
    ``head``.

    ``"aurora"`` initialises like Aurora does for its own variables (kernels: Kaiming uniform with
    ``a = sqrt(5)``; heads: truncated normal std 0.02, zero bias); ``"zeros"`` gives a kernel that
    leaves the pretrained tokens unchanged, or a head whose first output is exactly zero.
    """
    kernel, new_head = model.add_task_variable(
        name, kind, embed_init=embed_init, head_init=head_init
    )
    if kind == "surface":
        head.surf_embeds[name] = kernel
        head.surf_heads[name] = new_head
    else:
        head.atmos_embeds[name] = kernel
        head.atmos_heads[name] = new_head


def copy_task_variables(source: WpeftAurora, target: WpeftAurora) -> TaskHead:
    """Give ``target`` (a fresh backbone of the same config) the variables a task added to
    ``source`` (:meth:`~wpeft.backbones.aurora_adapter.WpeftAurora.task_variables`: those of
    :meth:`~wpeft.backbones.aurora_adapter.WpeftAurora.embedding_variables` beyond the backbone's
    own, one per variable on either backbone), in the same order, with zero kernels and heads:
    the shapes a method sees after ``task.setup``, without reading the task's data (budget probes).

    Returns:
        The new variables as a :class:`TaskHead` (the probe's ``head`` group).
    """
    head = TaskHead()
    for kind, name in source.task_variables():
        add_variable(target, head, name, kind, embed_init="zeros", head_init="zeros")  # type: ignore[arg-type]
    return head


def check_patch_grid(model: WpeftAurora, height: int, width: int) -> None:
    """The grid fits the backbone: its fixed grid if it has one (``model.fixed_grid()``), else
    multiples of the patch size and at least 3 patches each way (the Swin U-Net halves the
    patch grid twice)."""
    fixed = model.fixed_grid()
    if fixed is not None and (height, width) != fixed:
        raise DataError(
            f"Grid {height} x {width} differs from the {fixed[0]} x {fixed[1]} grid backbone "
            f"{model.config.name!r} reads; feed that grid (e.g. precipitation: "
            f"crop_size=({fixed[0]}, {fixed[1]}) on the world)."
        )
    patch = model.patch_size
    check_grid(height, width, patch)
    if height // patch < 3 or width // patch < 3:
        raise DataError(
            f"Grid {height} x {width} gives {height // patch} x {width // patch} patches; the "
            "backbone's Swin U-Net needs at least 3 x 3. Use a larger grid or crop."
        )


# --------------------------------------------------------------------------------------------
# scores and output attributes
# --------------------------------------------------------------------------------------------


def var_attrs(wb2: str, what: str = "") -> dict[str, str]:
    """``units``/``long_name`` attributes of a schema variable (``what`` is appended)."""
    spec = VARIABLES[wb2]
    return {"units": spec.units, "long_name": f"{spec.long_name}{' ' + what if what else ''}"}


def level_key(wb2: str, level: int | None) -> str:
    """Score-key suffix: ``"2m_temperature"`` or ``"temperature_850"``."""
    return wb2 if level is None else f"{wb2}_{int(level)}"


def per_level_scores(prefix: str, wb2: str, result: xr.DataArray) -> dict[str, float]:
    """``{"<prefix>/<wb2>[_<level>]": value}`` from a score reduced to scalars or to ``level``."""
    if "level" in result.dims:
        return {
            f"{prefix}/{level_key(wb2, int(lv))}": float(result.sel(level=lv))
            for lv in result["level"].values
        }
    return {f"{prefix}/{wb2}": float(result)}
