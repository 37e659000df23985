"""Run records, figures and the workbench on a Prithvi-WxC run.

``prithvi-tiny`` by hand: 32 x 64 grid, 4 x 4 patches -> an 8 x 16 patch grid; mask units of
8 x 16 px -> 4 x 4 = 16 units of 2 x 4 = 8 tokens. Blocks in execution order: encoder0.0-0.4,
decoder0.0-0.2 (local at even depth, global at odd depth). One 4-step WeatherPEFT run (module
fixture) serves the record, figure and workbench tests.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

pytest.importorskip("PrithviWxC", reason='prithviwxc is not installed (pip install -e ".[prithvi]")')

from wpeft import runs
from wpeft.backbones.aurora_adapter import build_backbone
from wpeft.backbones.configs import get_config
from wpeft.backbones.prithvi_adapter import WpeftPrithvi, build_prithvi
from wpeft.cli import main
from wpeft.errors import DataError
from wpeft.runs.attention_records import prompt_spread, record_format
from wpeft.runs.fisher_records import TENSOR_KINDS, _unpack, block_groups, classify
from wpeft.training.loop import TrainConfig, train

BLOCKS = [f"encoder0.{i}" for i in range(5)] + [f"decoder0.{i}" for i in range(3)]
D = 192
#: Entries of one Prithvi transformer per tensor kind (qkv and proj have no bias).
PER_BLOCK = {"qkv": 3 * D * D, "proj": D * D, "fc1": 4 * D * D + 4 * D, "fc2": 4 * D * D + D,
             "norm1": 2 * D, "norm2": 2 * D}
WORLD = {"nlat": 32, "nlon": 64, "days": 8, "spinup_days": 1, "ensemble_inits": 2,
         "ensemble_members": 2, "ensemble_lead_hours": 12}
PROMPTS = 3


@pytest.fixture(scope="module")
def tiny() -> WpeftPrithvi:
    return build_prithvi("prithvi-tiny")


@pytest.fixture(scope="module")
def prithvi_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step prithvi-tiny WeatherPEFT downscaling run, Fisher records at steps 0, 2, 3."""
    base = tmp_path_factory.mktemp("prithvi-records")
    mp = pytest.MonkeyPatch()
    mp.setenv("WPEFT_CACHE_DIR", str(base / "cache"))
    out = base / "runs" / "downscaling" / "prithvi-weatherpeft"
    try:
        train(TrainConfig(
            task="downscaling", method="weatherpeft", backbone="prithvi-tiny",
            method_options={"num_prompts": PROMPTS}, steps=4, batch_size=2, warmup_steps=1,
            checkpoint_every=0, task_options={"world": WORLD}, device="cpu", record_every=2,
        ), out, progress=False)
    finally:
        mp.undo()
    return out


# --- Fisher records ---------------------------------------------------------------------------


def test_prithvi_parameters_group_by_block_and_kind(tiny: WpeftPrithvi) -> None:
    names = [f"model.backbone.{n}" for n, _ in tiny.backbone.named_parameters()]
    groups = block_groups(names, tiny)
    assert "model.backbone.encoder.lgl_block.transformers.3.ff.1.net.3.bias" in names
    assert groups[names.index("model.backbone.encoder.lgl_block.transformers.3.ff.1.net.3.bias")] \
        == ("encoder0.3", "fc2")
    assert groups[names.index("model.backbone.decoder.lgl_block.transformers.1.attention.0.weight")] \
        == ("decoder0.1", "norm1")
    sizes: dict[tuple[str, str], int] = {}
    for g, (_, p) in zip(groups, tiny.backbone.named_parameters()):
        sizes[g] = sizes.get(g, 0) + p.numel()
    assert sizes == {(b, k): n for b in BLOCKS for k, n in PER_BLOCK.items()}


def test_aurora_groups_are_unchanged_by_asking_the_backbone() -> None:
    model = build_backbone("tiny")
    names = [f"model.backbone.{n}" for n, _ in model.backbone.named_parameters()]
    assert block_groups(names, model) == [classify(n) for n in names]
    assert {b for b, _ in block_groups(names, model)} >= {"encoder0.0", "decoder2.1", "other"}


def test_fisher_records_hold_one_mask_per_prithvi_block(prithvi_run: Path) -> None:
    run = runs.open(prithvi_run)
    fisher = run.fisher
    k, eligible = int(fisher.attrs["k"]), int(fisher.attrs["eligible"])
    assert [str(b) for b in fisher["block"].values] == BLOCKS  # execution order, no "other"
    assert list(fisher["step"].values) == [0, 2, 3]
    expected = np.array([[PER_BLOCK.get(t, np.nan) for t in TENSOR_KINDS] for _ in BLOCKS])
    np.testing.assert_array_equal(fisher["group_size"].values, expected)
    assert eligible == 8 * sum(PER_BLOCK.values())
    selected = fisher["selected"].sum(("block", "tensor"))
    np.testing.assert_array_equal(selected.values, [k] * 3)  # every entry of the mask, once
    np.testing.assert_array_equal(fisher["total_selected"].values, [k] * 3)
    assert 0 < k < eligible
    # the first mask kept for resuming holds exactly k entries too
    with np.load(prithvi_run / "records" / "fisher" / "masks" / "first.npz") as first:
        bits = first["bits"]
    flat = _unpack(bits, [torch.empty(eligible, dtype=torch.bool)])[0]
    assert int(flat.sum()) == k
    assert "encoder0.0/qkv" in list(fisher["matrix"].values)
    run.close()


# --- attention records ------------------------------------------------------------------------


def test_local_and_global_sequences_map_to_the_patch_grid_by_hand(tiny: WpeftPrithvi) -> None:
    local, glob = tiny.blocks[0], tiny.blocks[1]
    pos = tiny.sequence_positions(local)
    assert pos.shape == (16, 8)
    # unit 0: the 2 x 4 patches at the top left, row-major
    assert pos[0].tolist() == [0, 1, 2, 3, 16, 17, 18, 19]
    # unit 5 = unit row 1, col 1; token 6 = row 1, col 2 in the unit -> patch (3, 6)
    assert int(pos[5, 6]) == 3 * 16 + 6
    assert sorted(pos.flatten().tolist()) == list(range(128))  # each patch exactly once
    assert torch.equal(tiny.sequence_positions(glob), pos.T)  # token position t of every unit
    # Prithvi's own to_patching puts the patch grid in the same places
    grid = torch.arange(128.0).view(1, 1, 8, 16).expand(1, D, 8, 16).contiguous()
    assert torch.equal(tiny.prithvi.to_patching(grid)[0, :, :, 0].long(), pos)


def test_shifted_blocks_follow_prithvis_shifter() -> None:
    config = dataclasses.replace(get_config("prithvi-tiny"), name="shifted", encoder_shifting=True)
    model = build_prithvi(config)
    blocks = model.blocks
    assert [model.block_shifted(b) for b in blocks[:5]] == [False, False, True, True, False]
    shifted = model.sequence_positions(blocks[2])  # local, after the first global block
    # the shift is half a unit (1, 2) patches: the token at grid (0, 0) holds patch (7, 14)
    assert int(shifted[0, 0]) == 7 * 16 + 14
    # Prithvi's shifter applied to the unshifted global layout gives the same places
    unshifted = model.sequence_positions(blocks[1]).double()  # (tokens, units)
    x = unshifted.view(1, 8, 16, 1).expand(1, 8, 16, D).contiguous()
    model.prithvi.encoder_shifter.reset()
    rolled, _ = model.prithvi.encoder_shifter(x)
    assert torch.equal(rolled[0, :, :, 0].long(), model.sequence_positions(blocks[3]))
    assert torch.equal(rolled[0, :, :, 0].long().T, shifted)


def test_prompt_spread_by_hand() -> None:
    # two sequences of two tokens on a 1 x 1 x 4 grid, one prompt
    attention = torch.tensor([[[0.5, 0.25, 0.25]], [[0.2, 0.6, 0.2]]], dtype=torch.float64)
    positions = torch.tensor([[0, 1], [3, 2]])
    grid, kept = prompt_spread(attention, positions, (1, 1, 4))
    # renormalised over each sequence's tokens, halved (two sequences), put in place
    assert grid.flatten().tolist() == pytest.approx([0.25, 0.25, 0.125, 0.375])
    assert kept.tolist() == pytest.approx([0.35])
    # padding tokens (-1) are left out before renormalising
    grid, _ = prompt_spread(attention[:1], torch.tensor([[0, -1]]), (1, 1, 4))
    assert grid.tolist() == [[[1.0, 0.0, 0.0, 0.0]]]


def test_attention_records_of_a_prithvi_run(prithvi_run: Path) -> None:
    run = runs.open(prithvi_run)
    att = run.attention
    assert record_format(att) == 2 and att.attrs["backbone"] == "prithvi-tiny"
    assert att.attrs["variable_axis"] == "channel"
    blocks = [str(b) for b in att["block"].values]
    assert blocks == ["encoder0.0", "encoder0.1", "encoder0.4", "decoder0.1", "decoder0.2"]
    scopes = [str(s) for s in att["block_scope"].values]
    assert [s.split()[0] for s in scopes] == ["local", "global", "local", "global", "local"]
    assert att.sizes["latitude"] == 8 and att.sizes["longitude"] == 16 and att.sizes["prompt"] == PROMPTS
    assert att["prompt_to_patch"].isel(step=-1).dims == ("block", "prompt", "latitude", "longitude")
    spread = att["prompt_to_patch"].isel(step=-1).sum(("latitude", "longitude"))
    np.testing.assert_allclose(spread.values, 1.0, atol=1e-5)  # a distribution over the grid
    kept = att["prompt_self_attention"].isel(step=-1).values
    assert ((kept > 0) & (kept < 1)).all()
    pmap = att["prompt_map"].isel(step=-1).values
    assert pmap.shape == (5, PROMPTS, 8, 16) and ((pmap > 0) & (pmap < 1)).all()
    np.testing.assert_allclose(att["external_var_var"].sum("variable_k").values, 1.0, atol=1e-5)
    channels = [str(v) for v in att["variable"].values]
    assert len(channels) == 19 and channels[0] == "2m_temperature"
    assert "geopotential 500 hPa" in channels and "specific_humidity 250 hPa" in channels
    assert list(att["latent_level_kind"].values) == ["all channels"]
    run.close()


def test_aurora_attention_records_of_format_1_still_draw() -> None:
    from test_viz import make_attention

    from wpeft.viz.attention import plot_prompt_spread, plot_variable_attention

    old = make_attention()  # no format_version, no prompt_to_patch: Aurora records before 2
    assert record_format(old) == 1
    fig = plot_variable_attention(old, "encoder0.0")
    assert fig.axes[0].get_xlabel() == "key variable"
    with pytest.raises(DataError, match="format 1"):
        plot_prompt_spread(old, "encoder0.0", 0)


# --- figures and the workbench ----------------------------------------------------------------


def test_figures_of_a_prithvi_run(prithvi_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from wpeft.viz.attention import plot_variable_attention

    out = tmp_path / "fig"
    assert main(["figures", str(prithvi_run), "--out", str(out), "--dpi", "40"]) == 0
    names = {p.stem for p in out.glob("*.png")}
    tag = prithvi_run.name
    assert {f"{tag}-fisher-density", f"{tag}-fisher-mass", f"{tag}-fisher-overlap",
            f"{tag}-mask-encoder0.0-qkv"} <= names
    for block in ("encoder0.0", "encoder0.1", "decoder0.2"):
        assert {f"{tag}-attention-{block}-{v}" for v in
                ("variables", "patches", "prompt0", "prompt0-looks")} <= names
    assert f"{tag}-rmse-2m_temperature" in names
    att = xr.open_dataset(next((prithvi_run / "records" / "attention").glob("*.nc")))
    fig = plot_variable_attention(att, "encoder0.1")
    assert fig.axes[0].get_xlabel() == "key channel"
    assert "global (across mask units)" in fig.axes[0].get_title()


def test_workbench_lists_the_prithvi_run_and_draws_its_records(prithvi_run: Path) -> None:
    pytest.importorskip("panel")
    import holoviews as hv

    from wpeft.app.catalog import Catalog, DataCache
    from wpeft.app.workbench import Workbench

    root = prithvi_run.parent.parent
    catalog = Catalog(root, cache=DataCache())
    (entry,) = catalog.runs()
    assert entry.name == "downscaling/prithvi-weatherpeft" and entry.backbone == "prithvi-tiny"
    assert "prithvi-tiny" in entry.label and entry.has_fisher and entry.has_attention
    wb = Workbench(catalog, poll_ms=0, sync_url=False)
    wb.sel.view = "fisher"
    fisher = wb.views["fisher"]
    assert isinstance(fisher.heatmap.object, hv.HeatMap)
    assert list(fisher.step.options) == [0, 2, 3]
    wb.sel.view = "attention"
    att = wb.views["attention"]
    assert list(att.block.options) == ["encoder0.0", "encoder0.1", "encoder0.4", "decoder0.1",
                                       "decoder0.2"]
    att.block.value = "encoder0.1"
    att.prompt.value = 2
    assert "encoder0.1 (global" in att.var_var.alt_text  # pre-rendered, titled as the figure
    assert att.var_patch.alt_text.startswith("external attention over patch positions")
    from wpeft.viz.attention import plot_variable_attention
    from wpeft.viz.style import figure_png

    # the figure whose channel labels the test above checks
    records = catalog.attention(entry.name)
    assert att.var_var.object == figure_png(plot_variable_attention(records, "encoder0.1"))
    assert "prompt 2" in att.prompt_map.object.opts.get().kwargs["title"]


def test_recomputed_attention_is_prithvis_own(tiny: WpeftPrithvi) -> None:
    """attention_weights splits q / k as Prithvi's MultiheadAttention does: the weights times
    its v, projected, give the module's own output (local and global layouts)."""
    g = torch.Generator().manual_seed(0)
    for info, shape in ((tiny.blocks[0], (1, 16, 8, D)), (tiny.blocks[1], (1, 8, 16, D))):
        x = torch.randn(shape, generator=g)
        module = info.attention
        with torch.no_grad():
            attn = tiny.attention_weights(info, ((x, None),), {})  # (rows, heads, L, L)
            heads, rows = module.n_heads, x.reshape(-1, shape[2], D)
            v = module.qkv_layer(rows).view(rows.shape[0], shape[2], heads, -1).transpose(1, 2)
            v = v.chunk(3, dim=3)[2]
            out = module.w_layer((attn @ v).transpose(1, 2).reshape(rows.shape))
            own = module((x, None))
        assert attn.shape == (shape[1], heads, shape[2], shape[2])
        torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))
        torch.testing.assert_close(out.view(shape), own, atol=1e-5, rtol=1e-4)


def test_aurora_capture_is_tadps_and_its_spread_sums_to_one() -> None:
    """On Aurora the backbone-driven capture gives tadp.record_prompt_attention's numbers bit for
    bit (records of format 2 keep format 1's values), and prompt_to_patch of a coarser stage
    (2 x 2 patches per token) still sums to 1 over the patch grid."""
    from test_methods import batch_of, pretrained_like

    from wpeft.methods import create_method
    from wpeft.methods.tadp import record_prompt_attention
    from wpeft.runs.attention_records import capture_prompt_attention, expand_to_patch_grid

    model = pretrained_like()
    method = create_method("tadp", num_prompts=4)
    method.apply(model)
    model.eval()
    batch, blocks, gens = batch_of("tiny"), [0, 3], method.prompt_generators
    with torch.no_grad(), record_prompt_attention(model, gens, blocks, max_windows=1 << 30) as old:
        model(batch)
    with torch.no_grad(), capture_prompt_attention(model, gens, blocks) as new:
        model(batch)
    for i in blocks:
        assert torch.equal(old[i]["patch_to_prompt"], new[i]["patch_to_prompt"])
        assert torch.equal(old[i]["external"], new[i]["external"])
    res = new[3]["resolution"]
    assert res == (4, 4, 8)  # stage 1: half the 8 x 16 patch grid
    positions = model.sequence_positions(model.blocks[3], res)
    spread, _ = prompt_spread(new[3]["prompt_to_all"].double().mean(1), positions, res)
    grid, stride = expand_to_patch_grid(spread, 8, 16)
    assert stride == 2
    torch.testing.assert_close((grid / stride**2).sum((-2, -1)), torch.ones(4, dtype=torch.float64))
