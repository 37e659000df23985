"""Prompt-attention records of TADP methods (``tadp``, ``weatherpeft``).

At the end of training (and optionally every ``every`` steps), :class:`AttentionRecorder` runs
the model in eval mode on the first sample of one evaluation batch through
:func:`capture_prompt_attention` (which asks the backbone: ``attention_weights``,
``block_resolution``, ``sequence_positions``) and stores, for the chosen blocks (default: the
backbone's ``record_blocks()``: Aurora's first, a middle and the last; Prithvi-WxC's first
local and global, a middle, last global and last local), in ``<run>/records/attention/``:

* ``external_var_var`` ``(step, block, variable_q, variable_k)``: the generator's external
  attention A ``(V·S, V·S)`` over the kernel tokens (token ``v·S + s``, s = (t, ph, pw) of the
  patch-embedding kernel E ``(D, V, T, P, P)``) reduced to variables:
  ``var_var[a, b] = (1/S) Σ_{s_q} Σ_{s_k} A[(a, s_q), (b, s_k)]``, the attention mass a token of
  variable a gives to the tokens of variable b, averaged over a's S tokens. **Rows sum to 1.**
* ``external_var_patch`` ``(step, block, variable, t, ph, pw)``: attention *received* by each key
  token, averaged over all V·S queries: ``(1/(V·S)) Σ_q A[q, (v, t, ph, pw)]``. The whole array
  sums to 1 (per block).
* ``prompt_map_by_level`` ``(step, block, prompt, latent_level, latitude, longitude)``: inside the
  windows of the block, the softmax attention that each patch token pays to prompt token p
  (averaged over heads), put back at the token's place on the grid. Aurora's window partition is
  inverted exactly: the flat token positions are pushed through Aurora's own cyclic shift
  (``torch.roll`` by minus the shift of a shifted block, after ``maybe_adjust_windows``),
  ``pad_3d`` (padding positions marked -1 and dropped) and ``window_partition_3d``
  (:func:`window_positions`). All windows of the first sample are recorded. Tokens of deeper
  stages (2x, 4x coarser) are repeated onto the patch grid of the first stage, so every block
  shares one grid: ``latitude`` / ``longitude`` are the **patch centres** of the model grid (the
  mean latitude / longitude of the P x P grid points of a patch; ``block_stride`` says how many
  patches one token of the block spans). Values are in [0, 1].
* ``prompt_map`` ``(step, block, prompt, latitude, longitude)``: the same averaged over the
  ``latent_level`` axis (level 0 is Aurora's surface token level, 1.. the latent atmospheric
  levels of the Perceiver aggregation; ``latent_level_kind`` says so).
* ``prompt_to_patch`` ``(step, block, prompt, latitude, longitude)`` (format 2): where prompt p
  looks: its softmax attention as a query over the patch tokens of each sequence (prompt keys
  left out, the rest renormalised; mean over heads, sum over levels), put at the tokens' places,
  divided by the number of sequences and by the patches a coarser token spans: **sums to 1 over
  latitude x longitude** (:func:`prompt_spread`). ``prompt_self_attention`` ``(step, block,
  prompt)``: the mass left out, on the prompt keys.

Prithvi-WxC (format 2): one token per patch and no levels (``latent_level`` of size 1, "all
channels"); a local block's sequences are the 2-D mask units (the unit's patches, row-major), a
global block's are the token positions across all units; ``sequence_positions`` inverts
Prithvi's ``to_patching`` and the half-unit roll of shifted blocks, so every block maps onto
the ``(H/P, W/P)`` patch grid (``block_stride`` 1); ``block_scope`` says which kind of sequence
a block attends over. Its kernels E hold one row per *channel* (a surface variable or one
atmospheric variable at one level), not per variable: ``variable_axis`` is ``"channel"``,
labelled ``"geopotential 500 hPa"``, and the figures say "channel".

Format versions (:data:`FORMAT_VERSION`, attribute ``format_version``): records without it
(1) are Aurora records without ``prompt_to_patch``, ``prompt_self_attention``, ``block_scope``
and the ``backbone`` / ``variable_axis`` attributes; the readers and figures accept both and
read a missing ``variable_axis`` as ``"variable"``.

The variables are the rows of E the generators read: the backbone's, then the task's new ones
(precipitation's ``tp_<lead>h``, post-processing's ``<var>_logscale``). They are labelled with
WeatherBench2 names (``geopotential_at_surface`` for the static z, ``geopotential`` for the
atmospheric z; ``"<name> (<kind>)"`` for a task's pseudo-variable; ``"<name> <level> hPa"``
for a Prithvi-WxC channel), with ``aurora_name`` and ``kind`` as extra coordinates.
``step`` is the number of optimiser steps completed before the recording.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import xarray as xr

from wpeft.backbones.aurora_adapter import window_positions
from wpeft.errors import ConfigError, DataError
from wpeft.runs.store import RecordStore

if TYPE_CHECKING:
    from wpeft.methods.base import PEFTMethod
    from wpeft.methods.tadp import TADPGenerators

__all__ = [
    "FORMAT_VERSION",
    "AttentionRecorder",
    "capture_prompt_attention",
    "expand_to_patch_grid",
    "prompt_spread",
    "record_attention",
    "record_format",
    "reduce_external",
    "scatter_windows",
    "variable_labels",
    "window_positions",
]

#: Version of the record layout: 1 (no ``format_version`` attribute): Aurora only, without
#: ``prompt_to_patch`` / ``prompt_self_attention`` / ``block_scope``; 2: any backbone, with them
#: and the ``backbone`` / ``variable_axis`` attributes. Readers accept both
#: (:func:`record_format`).
FORMAT_VERSION = 2

#: What the ``variable`` axis holds, by the backbone's ``embedding_unit``.
VARIABLE_AXES = {
    "variable": "one patch-embedding kernel per variable (an atmospheric variable's kernel "
    "serves all its pressure levels)",
    "channel": "one patch-embedding kernel per input channel: a surface variable, or one "
    "atmospheric variable at one pressure level (Prithvi-WxC embeds channels, not variables)",
}


def scatter_windows(
    values: torch.Tensor, positions: torch.Tensor, res: tuple[int, int, int]
) -> torch.Tensor:
    """Window-ordered token values ``(n_windows, N_w, P)`` back onto the grid ``(P, C, H, W)``
    (``positions`` from :func:`window_positions`; padding tokens are dropped)."""
    if values.shape[:2] != positions.shape:
        raise ValueError(
            f"Attention for {tuple(values.shape[:2])} window tokens, positions for "
            f"{tuple(positions.shape)}: record all windows of one sample (batch size 1)."
        )
    C, H, W = res
    out = torch.zeros(C * H * W, values.shape[-1], dtype=values.dtype)
    valid = positions >= 0
    out[positions[valid]] = values[valid]
    return out.view(C, H, W, -1).permute(3, 0, 1, 2)


def _stride(fine: int, coarse: int) -> int:
    """The power of two f with ceil(fine / f) == coarse (Aurora's patch merging pads odd sizes)."""
    f = 1
    while -(-fine // f) > coarse:
        f *= 2
    if -(-fine // f) != coarse:
        raise DataError(f"A block resolution of {coarse} does not divide the patch grid's {fine}.")
    return f


def expand_to_patch_grid(grid: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, int]:
    """Repeat ``(..., H_b, W_b)`` tokens of a coarser stage onto the ``(height, width)`` patch grid.

    Returns:
        ``(..., height, width)`` and the stride (patches per token along each axis).
    """
    fh, fw = _stride(height, grid.shape[-2]), _stride(width, grid.shape[-1])
    if fh != fw:
        raise DataError(f"Unequal strides {fh} x {fw} between a block and the patch grid.")
    out = grid.repeat_interleave(fh, dim=-2).repeat_interleave(fw, dim=-1)
    return out[..., :height, :width], fh


def reduce_external(
    external: torch.Tensor, n_vars: int, space: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable x variable and variable x patch-position views of the external attention.

    Args:
        external: ``(V·S, V·S)`` row-stochastic attention, token ``v·S + s``.
        n_vars: V.
        space: ``(T, P_h, P_w)`` with S = T·P_h·P_w.

    Returns:
        ``var_var`` ``(V, V)`` (rows sum to 1) and ``var_patch`` ``(V, T, P_h, P_w)`` (sums to 1);
        see the module docstring.
    """
    S = int(np.prod(space))
    a = external.double().reshape(n_vars, S, n_vars, S)
    var_var = a.sum(dim=3).mean(dim=1)
    var_patch = a.mean(dim=(0, 1)).reshape(n_vars, *space)
    return var_var, var_patch


def variable_labels(
    model: Any, variables: Sequence[tuple[str, str]] | None = None
) -> tuple[list[str], list[str], list[str]]:
    """WB2 names, Aurora names and kinds of the V kernel variables: ``variables`` as
    ``(embedding, name)`` pairs (the generators' :attr:`~wpeft.methods.tadp.TADPGenerators.
    variables`: the backbone's, then a task's new ones), or ``model.config.variables`` order
    (surface, static, atmospheric). A task's pseudo-variable without a WB2 name is labelled
    ``"<name> (<kind>)"``; an atmospheric channel at one level (Prithvi-WxC's ``"z_500"``)
    ``"geopotential 500 hPa"``."""
    from wpeft.data.batch import wb2_name

    cfg = model.config
    if variables is None:
        variables = [("surface", v) for v in cfg.surf_vars + cfg.static_vars]
        variables += [("atmos", v) for v in cfg.atmos_vars]
    names, aurora, kinds = [], [], []
    for embedding, v in variables:
        kind = "atmos" if embedding == "atmos" else "static" if v in cfg.static_vars else "surface"
        try:
            names.append(wb2_name(v, kind))
        except DataError:
            names.append(_channel_label(v, kind))
        aurora.append(v)
        kinds.append(kind)
    return names, aurora, kinds


def prompt_spread(
    attention: torch.Tensor, positions: torch.Tensor, res: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the prompt tokens look, on the grid.

    Args:
        attention: ``(rows, P, P + N)`` softmax attention of the P prompt tokens (queries) over
            the keys of each sequence: the prompts, then the N sequence tokens.
        positions: ``(rows, N)`` flat token index into ``res`` (-1: padding), as the backbone's
            ``sequence_positions`` gives it.
        res: Token resolution ``(C, H, W)``.

    Returns:
        ``(P, H, W)``: the attention over the sequence's tokens renormalised over its valid
        tokens, summed over levels, divided by the number of rows (each token lies in one
        sequence, so it sums to 1 over H x W); and ``(P,)``: the mass on prompt keys, mean over
        rows.
    """
    n_prompt = attention.shape[1]
    kept = attention[..., :n_prompt].sum(dim=-1).mean(dim=0)
    tokens = attention[..., n_prompt:] * (positions >= 0)[:, None, :].to(attention)
    tokens = tokens / tokens.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(tokens.dtype).tiny)
    grid = scatter_windows(tokens.transpose(1, 2) / tokens.shape[0], positions, res)
    return grid.sum(dim=1), kept


def record_format(attention: xr.Dataset) -> int:
    """The layout version of attention records (1: written before versions, Aurora only)."""
    return int(attention.attrs.get("format_version", 1))


@contextmanager
def capture_prompt_attention(
    model: Any, generators: TADPGenerators, blocks: Sequence[int]
) -> Iterator[dict[int, dict[str, Any]]]:
    """Record the prompt attention of ``blocks`` at every forward within the context (model in
    eval mode, prompts installed); per block index:

    * ``"external"``: the generator's external attention ``(V·S, V·S)``;
    * ``"patch_to_prompt"``: ``(rows, heads, N, P)`` attention of each sequence token to each
      prompt; ``"prompt_to_all"``: ``(rows, heads, P, P + N)`` attention of each prompt over
      the prompts and the sequence's tokens (rows: windows of Aurora, mask units or token
      positions of Prithvi-WxC; the backbone's ``attention_weights``);
    * ``"resolution"``: the block's token resolution ``(C, H_b, W_b)`` (``block_resolution``).
    """
    if model.training:
        raise RuntimeError("capture_prompt_attention needs model.eval(): it is an analysis path.")
    infos = model.blocks
    records: dict[int, dict[str, Any]] = {i: {} for i in blocks}

    def block_hook(info: Any) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            records[info.index]["resolution"] = model.block_resolution(info, args, kwargs)

        return hook

    def attention_hook(info: Any) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            gen = generators[info.index]
            n = gen.to_prompts.out_features
            with torch.no_grad():
                _, external = gen(generators.kernels(model), return_attention=True)
                attn = model.attention_weights(info, args, kwargs)  # prompts prepended
            records[info.index].update(
                external=external.detach().cpu(),
                patch_to_prompt=attn[:, :, n:, :n].detach().cpu(),
                prompt_to_all=attn[:, :, :n, :].detach().cpu(),
            )

        return hook

    handles = []
    for i in blocks:
        info = infos[i]
        handles.append(info.block.register_forward_pre_hook(block_hook(info), with_kwargs=True))
        handles.append(
            info.attention.register_forward_pre_hook(attention_hook(info), with_kwargs=True)
        )
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def _channel_label(name: str, kind: str) -> str:
    """Label of a kernel row without a WB2 name: an atmospheric channel ``"z_500"`` (Prithvi-WxC
    embeds each level) as ``"geopotential 500 hPa"``, else ``"<name> (<kind>)"``."""
    from wpeft.data.batch import wb2_name

    base, _, level = name.rpartition("_")
    if kind == "atmos" and level.isdigit():
        try:
            return f"{wb2_name(base, 'atmos')} {level} hPa"
        except DataError:
            pass
    return f"{name} ({kind})"


def _patch_centres(values: torch.Tensor, n: int, patch: int) -> np.ndarray:
    v = values.detach().double().cpu()[: n * patch]
    return v.reshape(n, patch).mean(dim=1).numpy()


def record_attention(
    model: Any,
    generators: TADPGenerators,
    batch: Any,
    predict: Callable[[Any], Any],
    blocks: Sequence[int] | None = None,
) -> xr.Dataset:
    """One recording (no ``step`` dim) on the first sample of ``batch``.

    Args:
        model: The backbone (a TADP method applied).
        generators: ``method.prompt_generators``.
        batch: A :class:`~wpeft.tasks.base.TaskBatch` (only its first sample is used).
        predict: ``batch -> prediction`` running the model forward (``task.predict`` bound to
            the model).
        blocks: Block indices; default the backbone's ``record_blocks()``.

    Returns:
        The Dataset described in the module docstring.
    """
    infos = model.blocks
    chosen = list(blocks) if blocks is not None else model.record_blocks()
    bad = [b for b in chosen if not 0 <= b < len(infos)]
    if bad:
        raise ConfigError(f"Blocks {bad} do not exist; the backbone has {len(infos)} blocks.")
    batch = _first_sample(batch, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture_prompt_attention(model, generators, chosen) as records:
            predict(batch)
    finally:
        model.train(was_training)

    kernels = generators.kernels(model)  # E over the generators' variables (a task's included)
    _, V, T, Ph, Pw = kernels.shape
    P = model.config.patch_size
    lat, lon = batch.inputs.metadata.lat, batch.inputs.metadata.lon
    H0, W0 = lat.shape[-1] // P, lon.shape[-1] // P
    n_prompt = generators[chosen[0]].to_prompts.out_features

    var_var, var_patch, maps, strides, to_patch, to_self = [], [], [], [], [], []
    for i in chosen:
        rec = records[i]
        vv, vp = reduce_external(rec["external"], V, (T, Ph, Pw))
        var_var.append(vv.numpy())
        var_patch.append(vp.numpy())
        res = rec["resolution"]
        positions = model.sequence_positions(infos[i], res)
        a = rec["patch_to_prompt"].double().mean(dim=1)  # (rows, N, P): mean over heads
        grid = scatter_windows(a, positions, res)  # (P, C, H_b, W_b)
        grid, stride = expand_to_patch_grid(grid, H0, W0)
        maps.append(grid.numpy())
        strides.append(stride)
        spread, kept = prompt_spread(rec["prompt_to_all"].double().mean(dim=1), positions, res)
        spread, _ = expand_to_patch_grid(spread, H0, W0)
        to_patch.append((spread / stride**2).numpy())
        to_self.append(kept.numpy())
    C = maps[0].shape[1]

    names, aurora, kinds = variable_labels(model, generators.variables)
    maps_arr = np.stack(maps).astype(np.float32)  # (block, prompt, level, lat, lon)
    ds = xr.Dataset(
        {
            "external_var_var": (
                ("block", "variable_q", "variable_k"), np.stack(var_var).astype(np.float32),
                {"units": "1", "long_name": "external attention, variable to variable",
                 "description": "mean over the query variable's S kernel tokens of the attention "
                 "mass given to the key variable's tokens; rows sum to 1"},
            ),
            "external_var_patch": (
                ("block", "variable", "t", "ph", "pw"), np.stack(var_patch).astype(np.float32),
                {"units": "1", "long_name": "external attention received per kernel token",
                 "description": "attention received by key token (variable, t, ph, pw), averaged "
                 "over all V*S query tokens; sums to 1 per block"},
            ),
            "prompt_map": (
                ("block", "prompt", "latitude", "longitude"), maps_arr.mean(axis=2),
                {"units": "1", "long_name": "patch-to-prompt attention",
                 "description": "softmax attention of each window token to the prompt token, mean "
                 "over heads and latent levels, first sample of an evaluation batch"},
            ),
            "prompt_map_by_level": (
                ("block", "prompt", "latent_level", "latitude", "longitude"), maps_arr,
                {"units": "1", "long_name": "patch-to-prompt attention per latent level",
                 "description": "as prompt_map, per latent level (latent_level_kind says what "
                 "a level holds)"},
            ),
            "prompt_to_patch": (
                ("block", "prompt", "latitude", "longitude"),
                np.stack(to_patch).astype(np.float32),
                {"units": "1", "long_name": "prompt-to-patch attention",
                 "description": "softmax attention of the prompt token (query) over the patch "
                 "tokens (keys) of each attention sequence, renormalised over those tokens, put "
                 "at their places on the grid and divided by the number of sequences (and by "
                 "the patches a coarser token spans), mean over heads and levels: sums to 1 "
                 "over latitude x longitude"},
            ),
            "prompt_self_attention": (
                ("block", "prompt"), np.stack(to_self).astype(np.float32),
                {"units": "1", "long_name": "prompt-to-prompt attention",
                 "description": "attention mass the prompt token gives to the prompt tokens "
                 "(left out of prompt_to_patch), mean over heads and sequences"},
            ),
        },
        coords={
            "block": [infos[i].name for i in chosen],
            "block_index": ("block", np.array(chosen)),
            "block_stride": ("block", np.array(strides), {"units": "1",
                             "long_name": "patches per token along latitude and longitude"}),
            "block_scope": ("block", [model.attention_scope(infos[i]) for i in chosen],
                            {"long_name": "what one attention sequence of the block is"}),
            "variable": names,
            "variable_q": names,
            "variable_k": names,
            "aurora_name": ("variable", aurora),
            "kind": ("variable", kinds),
            "t": np.arange(T),
            "ph": np.arange(Ph),
            "pw": np.arange(Pw),
            "prompt": np.arange(n_prompt),
            "latent_level": np.arange(C),
            "latent_level_kind": ("latent_level", model.latent_level_kinds(C)),
            "latitude": ("latitude", _patch_centres(lat, H0, P),
                         {"units": "degrees_north", "long_name": "latitude of patch centres"}),
            "longitude": ("longitude", _patch_centres(lon, W0, P),
                          {"units": "degrees_east", "long_name": "longitude of patch centres"}),
        },
        attrs={
            "title": "TADP prompt-attention records",
            "format_version": FORMAT_VERSION,
            "backbone": str(model.config.name),
            "variable_axis": model.embedding_unit,
            "variable_axis_description": VARIABLE_AXES[model.embedding_unit],
            "static_variables": "",
            "step_description": "optimiser steps completed before the recording",
            "sample_time": str(np.asarray(batch.times)[0]),
        },
    )
    ds["t"].attrs.update(long_name="history step of the patch-embedding kernel")
    ds["ph"].attrs.update(long_name="row within the patch (kernel)")
    ds["pw"].attrs.update(long_name="column within the patch (kernel)")
    return ds


def _first_sample(batch: Any, device: torch.device) -> Any:
    """The batch cut to its first sample, inputs on ``device``."""
    inputs = batch.inputs
    inputs = dataclasses.replace(
        inputs,
        surf_vars={k: v[:1] for k, v in inputs.surf_vars.items()},
        atmos_vars={k: v[:1] for k, v in inputs.atmos_vars.items()},
        metadata=dataclasses.replace(inputs.metadata, time=inputs.metadata.time[:1]),
    ).to(device)
    return dataclasses.replace(
        batch,
        inputs=inputs,
        targets={k: v[:1] for k, v in batch.targets.items()},
        times=np.asarray(batch.times)[:1],
        extra={k: v[:1] for k, v in batch.extra.items()},
    )


class AttentionRecorder:
    """Records prompt attention of a TADP method at the end of training (and every ``every``).

    Args:
        method: An applied method with TADP generators (``method.prompt_generators``).
        model: The backbone.
        task: The task (its first ``split`` batch is the evaluation sample).
        run_dir: The run directory (records go to ``<run>/records/attention``).
        every: Also record every ``every`` completed steps (0: only at the end).
        blocks: Block indices; default the backbone's ``record_blocks()`` (Aurora: the first,
            a middle and the last; Prithvi-WxC: local and global blocks of both stages).
        split: Split the evaluation sample comes from.
        start_step: Step training starts from (> 0 when resuming); 0 clears old records.
    """

    kind = "attention"

    def __init__(
        self,
        method: PEFTMethod,
        model: Any,
        task: Any,
        run_dir: str | Path,
        *,
        every: int = 0,
        blocks: Sequence[int] | None = None,
        split: str = "val",
        start_step: int = 0,
    ) -> None:
        if method.prompt_generators is None:
            raise ConfigError(
                f"AttentionRecorder needs a TADP method (tadp, weatherpeft); got {method.name!r}."
            )
        self.method, self.model, self.task = method, model, task
        self.every = int(every)
        self.blocks = list(blocks) if blocks is not None else None
        self.split = split
        self.store = RecordStore(run_dir, self.kind, compress=True)
        if start_step <= 0:
            self.store.clear()
        else:
            self.store.truncate(start_step + 1)

    def _batch(self) -> Any:
        batch = next(iter(self.task.batches(self.split, 1, shuffle=False)), None)
        if batch is None:
            batch = next(iter(self.task.batches("test", 1, shuffle=False)))
        return batch

    def record(self, step: int) -> xr.Dataset:
        """Record now, as the state after ``step`` completed optimiser steps."""
        ds = record_attention(
            self.model,
            self.method.prompt_generators,
            self._batch(),
            lambda b: self.task.predict(self.model, b),
            self.blocks,
        )
        self.store.append(step, ds)
        return ds

    def on_step(self, step: int) -> None:
        """Record if ``every`` divides ``step`` (completed optimiser steps)."""
        if self.every and step % self.every == 0:
            self.record(step)

    def close(self, final_step: int) -> None:
        """Record the final state (unless already recorded at ``final_step``)."""
        if final_step not in self.store.steps():
            self.record(final_step)
