"""Run records: the append-only store, Fisher-mask and prompt-attention records, skill fields."""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

import wpeft
from wpeft import runs
from wpeft.errors import ConfigError, DataError
from wpeft.methods import create_method
from wpeft.methods.sfas import EntrySelection
from wpeft.runs.attention_records import (
    AttentionRecorder,
    expand_to_patch_grid,
    reduce_external,
    scatter_windows,
    window_positions,
)
from wpeft.runs.fisher_records import FisherRecorder, bin_edges, classify, jaccard, pool_mask
from wpeft.runs.layout import RunLayout, run_directories
from wpeft.runs.store import SIZES, RecordStore
from wpeft.training import loop
from wpeft.training.loop import TrainConfig

WORLD = {"nlat": 16, "nlon": 32, "days": 12, "spinup_days": 1, "ensemble_inits": 8, "ensemble_members": 3}


@pytest.fixture(scope="module")
def world_cache(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "world-cache")


@pytest.fixture(autouse=True)
def small_cache(world_cache, monkeypatch):
    monkeypatch.setenv("WPEFT_CACHE_DIR", world_cache)


# --- helpers ------------------------------------------------------------------------------------


def test_jaccard_and_union_by_hand() -> None:
    a = np.array([1, 1, 0, 0, 1], bool)
    b = np.array([0, 1, 1, 0, 1], bool)
    assert jaccard(a, b) == pytest.approx(2 / 4)
    assert jaccard(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(0.5)
    assert jaccard(a, a) == 1.0
    assert np.isnan(jaccard(np.zeros(3, bool), np.zeros(3, bool)))


def test_pool_mask_is_local_density() -> None:
    m = np.zeros((4, 6), bool)
    m[0, :3] = True  # top-left bin (rows 0-1, cols 0-2): 3 of 6
    m[3, 5] = True  # bottom-right bin: 1 of 6
    pooled = pool_mask(m, size=2)
    assert pooled.shape == (2, 2)
    np.testing.assert_allclose(pooled, [[0.5, 0.0], [0.0, 1 / 6]])
    # smaller than the image size: native size, no upsampling
    np.testing.assert_array_equal(pool_mask(m, size=32), m.astype(np.float32))
    # uneven bins: 5 rows into 2 bins -> sizes 2 and 3
    assert list(bin_edges(5, 2)) == [0, 2, 5]
    col = np.ones((5, 1), bool)
    col[4, 0] = False
    np.testing.assert_allclose(pool_mask(col, size=2)[:, 0], [1.0, 2 / 3])


def test_parameter_names_map_to_block_and_kind() -> None:
    base = "model.backbone."
    assert classify(base + "encoder_layers.0.blocks.1.attn.qkv.weight") == ("encoder0.1", "qkv")
    assert classify(base + "decoder_layers.2.blocks.0.mlp.fc2.bias") == ("decoder2.0", "fc2")
    assert classify(base + "encoder_layers.1.blocks.0.norm1.ln_modulation.1.weight") == ("encoder1.0", "norm1")
    assert classify(base + "encoder_layers.0.downsample.reduction.weight") == ("other", "other")
    assert classify(base + "time_mlp.0.weight") == ("other", "other")


# --- a fake selection method: hand-checkable records --------------------------------------------


class FakeSelection:
    """Masks chosen by a schedule, on three small backbone tensors of one block."""

    name = "fake"

    def __init__(self, schedule: dict[int, list[torch.Tensor]]) -> None:
        shapes = {
            "model.backbone.encoder_layers.0.blocks.0.attn.qkv.weight": (6, 4),
            "model.backbone.encoder_layers.0.blocks.0.attn.qkv.bias": (6,),
            "model.backbone.time_mlp.0.weight": (2, 2),
        }
        self.params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes.values()]
        total = sum(p.numel() for p in self.params)
        k = int(schedule[min(schedule)][0].sum() + schedule[min(schedule)][1].sum() + schedule[min(schedule)][2].sum())
        self.selection = EntrySelection(list(zip(shapes, self.params)), k)
        assert self.selection.total == total
        # a backbone says which block and tensor kind each parameter is (parameter_blocks)
        owner = {n.removeprefix("model.backbone."): classify(n) for n in list(shapes)[:2]}
        self.model = SimpleNamespace(blocks=[SimpleNamespace(name="encoder0.0")],
                                     parameter_blocks=lambda: owner)
        self.schedule = schedule

    def after_backward(self, step: int, total_steps: int) -> None:
        sel = self.selection
        buckets = sel.layout.zeros(torch.bool, sel.device)
        for view, m in zip(sel.layout.split(buckets), self.schedule[step]):
            view.copy_(m)
        sel.set_masks(buckets, step)  # as SFAS selects: the mask and its union
        for p, m in zip(self.params, sel.masks):
            p.grad.mul_(m)  # as SFAS does: gradients outside the mask are zeroed


def _masks(seed: int, k_per: tuple[int, int, int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape, k in zip(((6, 4), (6,), (2, 2)), k_per):
        flat = torch.zeros(int(np.prod(shape)), dtype=torch.bool)
        flat[torch.randperm(flat.numel(), generator=g)[:k]] = True
        out.append(flat.view(shape))
    return out


def test_fisher_records_match_a_hand_computation(tmp_path) -> None:
    schedule = {s: _masks(s, (5, 2, 1)) for s in range(4)}
    method = FakeSelection(schedule)
    rec = FisherRecorder(method, tmp_path, every=2, image_size=4).install()
    grads = {}
    for step in range(4):
        g = torch.Generator().manual_seed(100 + step)
        for p in method.params:
            p.grad = torch.randn(p.shape, generator=g)
        grads[step] = [p.grad.clone() for p in method.params]
        method.after_backward(step, 4)
        rec.on_step(step + 1)
    rec.close(4)
    assert "after_backward" not in method.__dict__  # unwrapped again
    ds = RecordStore(tmp_path, "fisher").open()
    assert list(ds.step.values) == [0, 2, 3]  # multiples of every, and the last step
    assert list(ds.block.values) == ["encoder0.0", "other"]

    def group(masks, step_grads=None):
        """(qkv of encoder0.0) = weight + bias; (other, other) = time_mlp."""
        qkv = torch.cat([masks[0].reshape(-1), masks[1]])
        other = masks[2].reshape(-1)
        return {"qkv": qkv, "other": other}

    recorded = [0, 2, 3]
    for j, step in enumerate(recorded):
        now = group(schedule[step])
        first = group(schedule[0])
        union = [torch.zeros_like(m) for m in schedule[0]]
        for s in range(step + 1):
            union = [u | m for u, m in zip(union, schedule[s])]
        union = group(union)
        g2 = group([g.pow(2) for g in grads[step]])
        for (block, kind), key in ((("encoder0.0", "qkv"), "qkv"), (("other", "other"), "other")):
            at = ds.sel(step=step, block=block, tensor=kind)
            n = now[key].numel()
            assert float(at.group_size) == n
            assert float(at.density) == pytest.approx(now[key].sum().item() / n)
            assert float(at.union_density) == pytest.approx(union[key].sum().item() / n)
            mass = (g2[key] * now[key]).sum() / g2[key].sum()
            assert float(at.fisher_mass) == pytest.approx(mass.item(), rel=1e-6)
            if j == 0:
                assert np.isnan(float(at.jaccard_previous))
            else:
                prev = group(schedule[recorded[j - 1]])[key]
                assert float(at.jaccard_previous) == pytest.approx(jaccard(now[key], prev))
            assert float(at.jaccard_first) == pytest.approx(jaccard(now[key], first[key]), nan_ok=True)
        assert np.isnan(float(ds.density.sel(step=step, block="other", tensor="qkv")))
        selected = (ds.density * ds.group_size).sel(step=step).sum()
        assert float(selected) == pytest.approx(method.selection.k)
    # the qkv weight (6 x 4) pooled to at most 4 x 4: 4 row bins of the 6 rows, 4 native columns
    img = ds.mask_image.sel(matrix="encoder0.0/qkv", step=3)
    np.testing.assert_allclose(img.values, pool_mask(schedule[3][0], 4))
    assert int(ds.image_rows.sel(matrix="encoder0.0/qkv")) == 4


def test_fisher_records_resume_keeps_first_and_previous_masks(tmp_path) -> None:
    schedule = {s: _masks(s, (5, 2, 1)) for s in range(6)}
    method = FakeSelection(schedule)
    rec = FisherRecorder(method, tmp_path, every=1).install()
    for step in range(4):  # "killed" after recording steps 0..3; the checkpoint is at step 2
        for p in method.params:
            p.grad = torch.ones(p.shape)
        method.after_backward(step, 6)
        rec.on_step(step + 1)
    rec.remove()
    resumed = FisherRecorder(method, tmp_path, every=1, start_step=2).install()
    assert resumed.store.steps() == [0, 1]
    for step in range(2, 6):
        for p in method.params:
            p.grad = torch.ones(p.shape)
        method.after_backward(step, 6)
        resumed.on_step(step + 1)
    resumed.close(6)
    ds = RecordStore(tmp_path, "fisher").open()
    assert list(ds.step.values) == list(range(6))

    def qkv(s):
        return torch.cat([schedule[s][0].reshape(-1), schedule[s][1]])

    at = ds.sel(block="encoder0.0", tensor="qkv")
    assert float(at.jaccard_first.sel(step=4)) == pytest.approx(jaccard(qkv(4), qkv(0)))
    assert float(at.jaccard_previous.sel(step=2)) == pytest.approx(jaccard(qkv(2), qkv(1)))
    # a fresh run in the same directory starts over
    FisherRecorder(method, tmp_path, every=1)
    assert RecordStore(tmp_path, "fisher").open() is None


@pytest.mark.parametrize("name", ["sfas", "fish"])
def test_real_selection_methods_record_k_and_fisher_mass(tmp_path, name) -> None:
    """SFAS (mask drawn inside after_backward) and FISH (static mask from prepare): the recorder
    reads g² before the method zeroes the gradients outside the mask."""
    from wpeft.backbones.aurora_adapter import build_backbone
    from wpeft.data.batch import random_batch

    model = build_backbone("tiny")
    with torch.no_grad():  # leave Aurora's identity initialisation so every block gets gradients
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    method = create_method(name, keep_ratio=0.01)
    method.apply(model)
    cfg = model.config
    batch = random_batch(cfg.surf_vars, cfg.static_vars, cfg.atmos_vars, batch_size=1, grid=(16, 32))

    def loss_fn():
        return sum(v.pow(2).mean() for v in model(batch).surf_vars.values())

    if method.preparation(1, 1) is not None:  # static masks select before training
        method.prepare(loss_fn, n_batches=1)
    rec = FisherRecorder(method, tmp_path, every=1).install()
    expected = []
    for step in range(2):
        for p in method.parameters():
            p.grad = None
        loss_fn().backward()
        g2 = [p.grad.pow(2) for p in method.selection.params]
        method.after_backward(step, 2)
        masked = sum(float((g * m).sum()) for g, m in zip(g2, method.masks))
        expected.append(masked / sum(float(g.sum()) for g in g2))
        rec.on_step(step + 1)
    rec.close(2)
    ds = RecordStore(tmp_path, "fisher").open()
    np.testing.assert_allclose(ds.total_fisher_mass.values, expected, rtol=1e-5)
    np.testing.assert_array_equal(ds.total_selected.values, method.selection.k)
    assert 0 < expected[0] < 1
    if name == "fish":  # a static mask never moves
        assert float(ds.total_jaccard_previous.sel(step=1)) == 1.0
        assert float(ds.total_union_density.sel(step=1)) == pytest.approx(float(ds.total_density.sel(step=1)))


def test_fisher_recorder_refuses_methods_without_selection(tmp_path) -> None:
    with pytest.raises(ConfigError, match="selection method"):
        FisherRecorder(create_method("lora"), tmp_path)


# --- the store: readers see complete records only ----------------------------------------------


def _record(step: int, n: int = 50) -> xr.Dataset:
    return xr.Dataset(
        {"x": (("item",), np.full(n, float(step)), {"units": "1", "long_name": "x"})},
        coords={"item": np.arange(n)},
        attrs={"title": "test"},
    )


def test_reader_ignores_half_written_and_unindexed_chunks(tmp_path) -> None:
    store = RecordStore(tmp_path, "demo")
    assert store.open() is None
    for s in (0, 10):
        store.append(s, _record(s))
    # a chunk being written (.tmp) and a finished chunk whose index update has not happened yet
    (store.path / "step-00000020.nc.tmp").write_bytes(b"\x89HDF half written")
    _record(30).expand_dims(step=[30]).to_netcdf(store.path / "step-00000030.nc")
    ds = store.open()
    assert list(ds.step.values) == [0, 10]
    assert ds.x.dims == ("step", "item") and ds.x.attrs["units"] == "1"
    np.testing.assert_array_equal(ds.x.sel(step=10).values, 10.0)
    store.append(10, _record(11))  # re-recording a step replaces it
    assert float(store.open().x.sel(step=10)[0]) == 11.0
    store.truncate(5)
    assert store.steps() == [0] and not (store.path / "step-00000010.nc").exists()


def test_concurrent_append_and_read(tmp_path) -> None:
    store = RecordStore(tmp_path, "demo")
    done = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for s in range(25):
                store.append(s, _record(s, n=2000))
        except Exception as e:  # noqa: BLE001  (reported by the reading thread below)
            errors.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=write)
    thread.start()
    seen = 0
    while not done.is_set() or seen < 25:
        ds = RecordStore(tmp_path, "demo").open()
        if ds is None:
            continue
        steps = list(ds.step.values)
        assert steps == list(range(len(steps)))  # a prefix, in order
        assert not np.isnan(ds.x.values).any()  # every record complete
        np.testing.assert_array_equal(ds.x.values[:, 0], steps)
        seen = len(steps)
        if done.is_set() and seen == 25:
            break
    thread.join()
    assert not errors and seen == 25


# --- a short run with the recorders attached as the loop will --------------------------------


def train_with_recorders(cfg: TrainConfig, run_dir: Path, monkeypatch):
    """``train`` (which attaches the recorders itself) with SFAS's own full mask history
    (:class:`MaskRecorder`) kept for hand checks. Returns the summary and what was held."""
    from wpeft.methods.sfas import MaskRecorder

    real_prepare = loop.prepare_run
    held: dict = {}

    def prepare(c, *args):
        model, task, method, reference, info = real_prepare(c, *args)
        history = MaskRecorder()
        method.add_mask_callback(history)
        held.update(history=history, method=method, reference=reference)
        return model, task, method, reference, info

    monkeypatch.setattr(loop, "prepare_run", prepare)
    summary = loop.train(cfg, run_dir, progress=False)
    return summary, held


@pytest.fixture(scope="module")
def weatherpeft_run(tmp_path_factory, world_cache):
    mp = pytest.MonkeyPatch()
    mp.setenv("WPEFT_CACHE_DIR", world_cache)
    try:
        run_dir = tmp_path_factory.mktemp("runs") / "downscaling" / "weatherpeft-s0"
        cfg = TrainConfig(
            task="downscaling", method="weatherpeft", steps=5, batch_size=2, warmup_steps=1,
            checkpoint_every=0, task_options={"world": WORLD}, device="cpu",
            method_options={"keep_ratio": 0.002, "num_prompts": 3}, record_every=2,
        )
        summary, held = train_with_recorders(cfg, run_dir, mp)
    finally:
        mp.undo()
    return run_dir, summary, held


def test_sfas_run_records_masks_of_size_k(weatherpeft_run) -> None:
    run_dir, _, held = weatherpeft_run
    run = runs.open(run_dir)
    ds = run.fisher
    k = held["method"].selection.k
    assert ds.attrs["k"] == k and ds.attrs["method"] == "weatherpeft"
    assert list(ds.step.values) == [0, 2, 4]
    selected = (ds.density * ds.group_size).sum(("block", "tensor"))
    np.testing.assert_allclose(selected.values, k, rtol=1e-9)
    np.testing.assert_array_equal(ds.total_selected.values, k)
    for name in ("jaccard_previous", "jaccard_first", "fisher_mass", "density", "union_density"):
        v = ds[name].values
        assert np.nanmin(v) >= 0 and np.nanmax(v) <= 1, name
        assert ds[name].attrs["units"] == "1" and ds[name].attrs["long_name"]
    assert np.isnan(ds.jaccard_previous.sel(step=0)).all()
    assert (ds.union_density >= ds.density - 1e-12).where(np.isfinite(ds.density), True).all()
    # hand computation from the method's full mask history (every step's mask)
    history = dict(held["history"].history)
    names = held["method"].selection.names
    shapes = [p.shape for p in held["method"].selection.params]
    idx = [i for i, n in enumerate(names) if classify(n) == ("encoder0.0", "fc1")]

    def group_mask(step):
        parts = []
        for i in idx:
            m = torch.zeros(shapes[i].numel(), dtype=torch.bool)
            m[history[step][names[i]]] = True
            parts.append(m)
        return torch.cat(parts)

    at = ds.sel(block="encoder0.0", tensor="fc1")
    assert float(at.jaccard_previous.sel(step=4)) == pytest.approx(jaccard(group_mask(4), group_mask(2)), nan_ok=True)
    assert float(at.jaccard_first.sel(step=2)) == pytest.approx(jaccard(group_mask(2), group_mask(0)), nan_ok=True)
    union = group_mask(0) | group_mask(1) | group_mask(2) | group_mask(3) | group_mask(4)
    assert float(at.union_density.sel(step=4)) == pytest.approx(union.float().mean().item())
    assert ds.mask_image.dims == ("step", "matrix", "row", "col")
    assert "encoder0.0/qkv" in ds.matrix.values and "decoder2.1/fc2" in ds.matrix.values


def test_attention_records_shapes_and_normalisation(weatherpeft_run) -> None:
    run_dir, _, _ = weatherpeft_run
    ds = runs.open(run_dir).attention
    assert list(ds.step.values) == [5]
    assert list(ds.block.values) == ["encoder0.0", "decoder0.0", "decoder2.1"]
    V = 12
    assert ds.external_var_var.dims == ("step", "block", "variable_q", "variable_k")
    assert ds.external_var_var.shape == (1, 3, V, V)
    np.testing.assert_allclose(ds.external_var_var.sum("variable_k").values, 1.0, atol=1e-5)
    np.testing.assert_allclose(ds.external_var_patch.sum(("variable", "t", "ph", "pw")).values, 1.0, atol=1e-5)
    assert ds.external_var_patch.dims == ("step", "block", "variable", "t", "ph", "pw")
    assert ds.external_var_patch.shape[3:] == (2, 4, 4)
    names = list(ds.variable.values)
    assert "geopotential_at_surface" in names and "geopotential" in names
    assert list(ds.aurora_name.values).count("z") == 2
    pm = ds.prompt_map
    assert pm.dims == ("step", "block", "prompt", "latitude", "longitude")
    assert pm.sizes["prompt"] == 3
    assert float(pm.min()) >= 0 and float(ds.prompt_map_by_level.max()) <= 1
    assert float(pm.max()) > 0
    # patch centres of the model grid (16 x 32, patch 4)
    fields = runs.open(run_dir).fields
    lat = fields.latitude.values.reshape(4, 4).mean(1)
    lon = fields.longitude.values.reshape(8, 4).mean(1)
    np.testing.assert_allclose(ds.latitude.values, lat)
    np.testing.assert_allclose(ds.longitude.values, lon)
    assert ds.latitude.attrs["units"] == "degrees_north"
    assert list(ds.block_stride.values) == [1, 4, 1]


def test_runs_open_scan_and_table(weatherpeft_run) -> None:
    run_dir, summary, _ = weatherpeft_run
    run = runs.open(run_dir)
    assert run.config["method"] == "weatherpeft" and run.summary["steps"] == 5
    assert run.metrics.empty  # no intermediate evaluation in this run
    assert "2m_temperature_rmse" in run.skill and run.skill["2m_temperature_rmse"].dims == ("latitude", "longitude")
    found = runs.scan(run_dir.parent.parent)
    assert [r.path for r in found] == [run_dir]
    df = runs.table(found)
    assert df.loc[0, "method"] == "weatherpeft"
    assert df.loc[0, "trainable_backbone"] == summary["trainable"]["backbone"]
    assert df.loc[0, "rmse/2m_temperature"] == summary["scores"]["rmse/2m_temperature"]
    with pytest.raises(DataError, match="not a run directory"):
        runs.open(run_dir / "records")


# --- the three sizes of a run ---------------------------------------------------------------------


def test_run_sizes_by_hand() -> None:
    summary = {
        "budget_fraction": 0.02,
        "changed": {"backbone": 40, "encoder": 0, "decoder": 0, "head": 10, "added": 20,
                    "total": 70},
        "backbone_parameters": 1000,
        "adapter_bytes": 500,
        "full_checkpoint_bytes": 4000,
    }
    assert runs.run_sizes(summary) == {
        "budget_fraction": 0.02,
        "changed_fraction": 0.06,  # (70 - 10) / 1000: backbone and added, not the head
        "adapter_bytes": 500,
        "adapter_fraction": 0.125,  # 500 / 4000
    }
    # what a summary records is taken as it is
    recorded = runs.run_sizes({**summary, "changed_fraction": 0.5, "adapter_fraction": 0.25})
    assert (recorded["changed_fraction"], recorded["adapter_fraction"]) == (0.5, 0.25)
    # a run still training, a summary without the counts, values of the wrong type: NaN
    for partial_summary in (None, {}, {"changed": None, "adapter_bytes": "big",
                                       "backbone_parameters": 0, "full_checkpoint_bytes": 0}):
        sizes = runs.run_sizes(partial_summary)
        assert set(sizes) == set(SIZES) and all(np.isnan(v) for v in sizes.values())


def test_a_run_reports_its_three_sizes(weatherpeft_run) -> None:
    run_dir, summary, held = weatherpeft_run
    method, reference = held["method"], held["reference"]
    # changed: the entries that differ from the pretrained weights, counted here from the model
    differing = sum(
        int((p.detach() != reference[f"backbone.{name}"]).sum())
        for name, p in method.model.backbone.named_parameters()
    )
    changed = summary["changed"]
    assert changed["backbone"] == differing > 0
    assert summary["backbone_parameters"] == sum(
        v.numel() for k, v in reference.items() if k.startswith("backbone.")
    )
    assert summary["changed_fraction"] == pytest.approx(
        (changed["total"] - changed["head"]) / summary["backbone_parameters"], rel=1e-12
    )
    # a selection method changes at least its per-step k (and here TADP's generators too)
    assert summary["changed_fraction"] >= summary["budget_fraction"] > 0
    # the adapter file's bytes, and the full checkpoint's: the backbone in float32
    assert summary["adapter_bytes"] == (run_dir / "adapter.safetensors").stat().st_size
    assert summary["full_checkpoint_bytes"] == 4 * summary["backbone_parameters"]
    assert summary["adapter_fraction"] == pytest.approx(
        summary["adapter_bytes"] / summary["full_checkpoint_bytes"], rel=1e-12
    )
    assert 0 < summary["adapter_fraction"] < 1
    saved = json.loads((run_dir / "summary.json").read_text())
    assert runs.run_sizes(saved) == {k: saved[k] for k in SIZES}
    row = runs.table([runs.open(run_dir)]).iloc[0]
    assert {k: row[k] for k in SIZES} == {k: saved[k] for k in SIZES}


# --- run directories written by earlier releases -------------------------------------------------

#: A run directory written by wpeft 0.1.0 (weatherpeft, 4 steps; see the commit that added it).
FIXTURE = Path(__file__).parent / "data" / "run-v0.1-weatherpeft"


@pytest.fixture
def old_runs(tmp_path) -> Path:
    """A runs root holding a copy of the 0.1.0 run directory at ``downscaling/weatherpeft``."""
    root = tmp_path / "runs"
    shutil.copytree(FIXTURE, root / "downscaling" / "weatherpeft")
    return root


def test_run_directories_of_wpeft_0_1_still_open(old_runs) -> None:
    path = old_runs / "downscaling" / "weatherpeft"
    summary = json.loads((FIXTURE / "summary.json").read_text())
    run = runs.open(path)
    assert (run.task, run.method, run.budget, run.seed) == ("downscaling", "weatherpeft", 0.003, 0)
    assert run.finished and run.config["steps"] == 4 and run.summary == summary
    assert list(run.metrics["step"]) == [2] and "rmse/2m_temperature" in run.metrics
    assert list(run.fisher.step.values) == [0, 2, 3] and list(run.attention.step.values) == [4]
    assert "2m_temperature_target" in run.fields
    assert run.skill["2m_temperature_rmse"].dims == ("latitude", "longitude")
    run.close()
    assert [r.path for r in runs.scan(old_runs)] == [path]
    df = runs.table(old_runs)
    assert len(df) == 1 and bool(df.loc[0, "finished"])
    assert df.loc[0, "trainable_backbone"] == summary["trainable"]["backbone"]
    assert df.loc[0, "changed_total"] == summary["changed"]["total"]
    assert df.loc[0, "budget_fraction"] == summary["budget_fraction"]
    assert df.loc[0, "rmse/2m_temperature"] == summary["scores"]["rmse/2m_temperature"]
    # sizes of a run written before they were recorded: from its counts where it has them
    assert df.loc[0, "changed_fraction"] == pytest.approx(186051 / 4969216)
    assert df.loc[0, "adapter_bytes"] == 773660
    assert np.isnan(df.loc[0, "adapter_fraction"])  # no full_checkpoint_bytes: unknown
    assert pd.isna(df.loc[0, "problem"])


def _damage(run: Path, case: str) -> None:
    """Break one file of ``run`` (a copy of the fixture) as named by ``case``."""
    summary = json.loads((FIXTURE / "summary.json").read_text())
    if case == "trainable-null":
        summary["trainable"] = None
        (run / "summary.json").write_text(json.dumps(summary))
    elif case == "summary-missing-keys":
        del summary["changed"], summary["scores"]
        (run / "summary.json").write_text(json.dumps(summary))
    elif case == "summary-bad-json":
        (run / "summary.json").write_text('{"task": "downscaling", "trainable": {"backbone": 1')
    elif case == "config-garbage-bytes":
        (run / "config.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00garbage")
    elif case == "config-bad-json":
        (run / "config.json").write_text('{"task": "downscaling", "method": ')
    elif case == "metrics-truncated":
        with open(run / "metrics.jsonl", "a") as f:
            f.write('{"step": 4, "split": "val", "loss": 0.3')
    elif case == "metrics-garbage-line":
        text = (run / "metrics.jsonl").read_text()
        (run / "metrics.jsonl").write_text("not json at all\n" + text)
    elif case == "records-newer-format":
        index = json.loads((run / "records/fisher/index.json").read_text())
        (run / "records/fisher/index.json").write_text(json.dumps({**index, "format": 2}))
    else:
        raise AssertionError(case)


#: Damage -> the problem the broken run is listed with.
DAMAGES = {
    "trainable-null": "summary.json: trainable is null, not an object",
    "summary-missing-keys": "summary.json lacks changed, scores",
    "summary-bad-json": "summary.json is not valid JSON",
    "config-garbage-bytes": "config.json is not UTF-8 text",
    "config-bad-json": "config.json is not valid JSON",
    "metrics-truncated": "metrics.jsonl: the last line is cut off",
    "metrics-garbage-line": "metrics.jsonl: line 1 is not a JSON object",
    "records-newer-format": "records/fisher/index.json has record format 2",
}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_a_malformed_file_is_a_problem_of_its_run_only(old_runs, case) -> None:
    good = old_runs / "downscaling" / "weatherpeft"
    bad = Path(shutil.copytree(good, old_runs / "downscaling" / "damaged"))
    _damage(bad, case)
    summary = json.loads((FIXTURE / "summary.json").read_text())
    found = runs.scan(old_runs)
    assert [r.path for r in found] == [bad, good]
    df = runs.table(found).set_index("path")
    ok, broken = df.loc[str(good)], df.loc[str(bad)]
    assert pd.isna(ok["problem"]) and runs.open(good).problem is None
    assert ok["trainable_backbone"] == summary["trainable"]["backbone"]
    assert ok["rmse/2m_temperature"] == summary["scores"]["rmse/2m_temperature"]
    assert DAMAGES[case] in broken["problem"] and "\n" not in broken["problem"]
    assert DAMAGES[case] in runs.open(bad).problem
    assert str(bad) not in broken["problem"]  # names the file, not the server's path
    assert bool(broken["finished"])
    if case.startswith("config"):
        assert broken["task"] == "?" and broken["method"] == "?"
        with pytest.raises(DataError, match=DAMAGES[case]):
            _ = runs.open(bad).config
    else:
        assert (broken["task"], broken["method"], broken["seed"]) == ("downscaling", "weatherpeft", 0)
    if case == "trainable-null":
        assert np.isnan(broken["trainable_backbone"])
        assert broken["changed_backbone"] == summary["changed"]["backbone"]
        assert broken["rmse/2m_temperature"] == summary["scores"]["rmse/2m_temperature"]
    if case.startswith("metrics"):
        assert list(runs.open(bad).metrics["step"]) == [2]
    if case == "records-newer-format":
        with pytest.raises(DataError, match="this wpeft reads format 1"):
            _ = runs.open(bad).fisher
        assert list(runs.open(bad).attention.step.values) == [4]


def test_a_truncated_metrics_line_is_no_problem_while_training(old_runs) -> None:
    run = old_runs / "downscaling" / "weatherpeft"
    (run / "summary.json").unlink()  # still training: the last line is being written
    _damage(run, "metrics-truncated")
    opened = runs.open(run)
    assert opened.problem is None and list(opened.metrics["step"]) == [2]


def test_run_layout_names_every_file_of_a_run(tmp_path) -> None:
    layout = RunLayout(str(tmp_path / "run"))
    assert layout.path == tmp_path / "run"
    assert layout.config.name == "config.json" and layout.summary.name == "summary.json"
    assert layout.metrics.name == "metrics.jsonl" and layout.checkpoint.name == "checkpoint.pt"
    assert layout.fields.name == "fields.nc" and layout.adapter.name == "adapter"
    assert layout.record_index("fisher") == layout.path / "records" / "fisher" / "index.json"
    assert layout.fisher_masks == layout.path / "records" / "fisher" / "masks"
    assert not layout.is_run and not layout.finished
    copy = RunLayout(shutil.copytree(FIXTURE, tmp_path / "a" / "run"))
    assert copy.is_run and copy.finished and copy.has_fields and copy.has_records("attention")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "config.json").write_text(json.dumps({"nlat": 16}))  # not a run's
    (copy.records / "config.json").write_text("{}")  # inside records/: never looked at
    assert run_directories(tmp_path) == [tmp_path / "a" / "run", tmp_path / "data"]
    assert not RunLayout(tmp_path / "data").is_run
    with pytest.raises(dataclasses.FrozenInstanceError):
        copy.path = tmp_path  # type: ignore[misc]


#: The file names of a run directory, spelled only in wpeft/runs/layout.py.
RUN_FILE_NAMES = ("summary.json", "config.json", "metrics.jsonl", "checkpoint.pt", "fields.nc")
#: Files of the same name that do not belong to a run directory: (module, name).
NOT_RUN_FILES = {
    ("wpeft/training/pretrain.py", "checkpoint.pt"),  # a pretraining directory's checkpoint
    ("wpeft/data/world.py", "config.json"),  # the config of a cached world
}


def _code_strings(tree: ast.AST) -> list[ast.Constant]:
    """String constants of a module (f-string parts included) except docstrings."""
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            docstrings.add(id(body[0].value))
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings]


def test_run_file_names_are_spelled_only_in_the_layout() -> None:
    package = Path(wpeft.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        module = path.relative_to(package.parent).as_posix()
        if module == "wpeft/runs/layout.py":
            continue
        for node in _code_strings(ast.parse(path.read_text(encoding="utf-8"))):
            found += [f"{module}:{node.lineno}: {name!r}" for name in RUN_FILE_NAMES
                      if name in node.value and (module, name) not in NOT_RUN_FILES]
    assert not found, "run file names outside wpeft/runs/layout.py:\n" + "\n".join(found)


def test_store_and_skill_do_not_import_each_other() -> None:
    tree = ast.parse((Path(wpeft.__file__).parent / "runs" / "skill.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "wpeft.runs.store" not in imported


# --- window inversion -----------------------------------------------------------------------------


def test_window_positions_cover_every_token_once() -> None:
    res = (4, 6, 10)  # padding in H and W, shifted
    pos = window_positions(res, (2, 4, 8), (1, 2, 4))
    valid = pos[pos >= 0]
    assert sorted(valid.tolist()) == list(range(4 * 6 * 10))
    assert pos.shape == (2 * 2 * 2, 2 * 4 * 8)
    # unshifted, unpadded: window (0, 0, 0) holds rows 0..3, cols 0..7 of level 0 and 1
    pos = window_positions((2, 4, 8), (2, 4, 8), (0, 0, 0))
    np.testing.assert_array_equal(pos[0], np.arange(64))
    values = torch.rand(pos.shape[0], pos.shape[1], 3)
    grid = scatter_windows(values, pos, (2, 4, 8))
    assert grid.shape == (3, 2, 4, 8)
    np.testing.assert_array_equal(grid[:, 1, 2, 5], values[0, 1 * 32 + 2 * 8 + 5])


def test_window_positions_invert_aurora_blocks() -> None:
    """Each window token of every block equals the block input at the recorded position."""
    from wpeft.backbones.aurora_adapter import build_backbone
    from wpeft.data.batch import random_batch

    model = build_backbone("tiny").eval()
    seen: dict[int, dict] = {}

    def block_hook(i):
        def hook(module, args):
            seen.setdefault(i, {})["input"] = args[0].detach()
            seen[i]["res"] = tuple(args[2])
        return hook

    def attn_hook(i):
        def hook(module, args, kwargs):
            seen[i]["windows"] = (args[0] if args else kwargs["x"]).detach()
        return hook

    handles = []
    for info in model.blocks:
        handles.append(info.block.register_forward_pre_hook(block_hook(info.index)))
        handles.append(info.attention.register_forward_pre_hook(attn_hook(info.index), with_kwargs=True))
    cfg = model.config
    batch = random_batch(cfg.surf_vars, cfg.static_vars, cfg.atmos_vars, batch_size=1, grid=(32, 64))
    with torch.no_grad():
        model(batch)
    for h in handles:
        h.remove()
    shifted = 0
    for info in model.blocks:
        rec = seen[info.index]
        pos = window_positions(rec["res"], info.block.window_size, info.block.shift_size)
        tokens = rec["input"][0]  # (C·H·W, D)
        windows = rec["windows"]  # (nW, N_w, D)
        valid = pos >= 0
        torch.testing.assert_close(windows[valid], tokens[pos[valid]])
        assert torch.all(windows[~valid] == 0)
        shifted += info.shifted and rec["res"][1] > info.block.window_size[1]
    assert shifted  # at least one block with a real latitude shift was checked


def test_external_reductions_by_hand() -> None:
    V, space = 2, (1, 1, 2)  # S = 2: tokens (v0,s0) (v0,s1) (v1,s0) (v1,s1)
    a = torch.tensor(
        [[0.5, 0.5, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]]
    )
    var_var, var_patch = reduce_external(a, V, space)
    np.testing.assert_allclose(var_var.numpy(), [[0.75, 0.25], [0.75, 0.25]])
    np.testing.assert_allclose(var_patch.reshape(V, 2).numpy(), [[1.75 / 4, 1.25 / 4], [0.75 / 4, 0.25 / 4]])
    grid = torch.arange(2 * 3).reshape(1, 2, 3).float()
    out, stride = expand_to_patch_grid(grid, 4, 5)  # 2x coarser, odd width padded by merging
    assert stride == 2 and out.shape == (1, 4, 5)
    assert out[0, 3, 4] == grid[0, 1, 2]


def test_attention_recorder_needs_tadp(tmp_path) -> None:
    with pytest.raises(ConfigError, match="TADP"):
        AttentionRecorder(create_method("sfas"), None, None, tmp_path)


# --- skill ----------------------------------------------------------------------------------------


def _fields(pred: np.ndarray, truth: np.ndarray, lat=(10.0, -10.0), times=None) -> xr.Dataset:
    T = pred.shape[0]
    if times is None:
        times = np.datetime64("2000-01-01T00", "ns") + np.arange(T) * np.timedelta64(6, "h")
    coords = {"time": times, "latitude": np.array(lat), "longitude": np.array([0.0, 120.0, 240.0])}
    dims = ("time", "latitude", "longitude")
    attrs = {"units": "K", "long_name": "2 metre temperature"}
    return xr.Dataset(
        {"2m_temperature": (dims, pred, attrs), "2m_temperature_target": (dims, truth, attrs)},
        coords=coords,
    )


def test_skill_difference_sign_and_significance(tmp_path) -> None:
    rng = np.random.default_rng(0)
    T = 40
    truth = rng.normal(280, 5, (T, 2, 3))
    noise_b = rng.normal(0, 1.0, (T, 2, 3))
    pred_b = truth + noise_b
    pred_a = truth + noise_b  # identical to B except:
    pred_a[:, 0, 0] = truth[:, 0, 0] + 0.1 * rng.normal(size=T)  # A clearly better here
    pred_a[:, 1, 2] = truth[:, 1, 2] + 3.0 * rng.normal(size=T)  # A clearly worse here
    pred_a[:, 0, 1] = truth[:, 0, 1] + noise_b[:, 0, 1] * (1 + 0.01 * rng.normal(size=T))  # ~same
    a, b = _fields(pred_a, truth), _fields(pred_b, truth)
    out = runs.skill_difference(a, b, "rmse")
    diff = out.difference.sel(variable="2m_temperature")
    sig = out.significant.sel(variable="2m_temperature")
    assert float(diff[0, 0]) < 0 and bool(sig[0, 0])
    assert float(diff[1, 2]) > 0 and bool(sig[1, 2])
    assert not bool(sig[0, 1])
    assert float(diff[1, 0]) == 0 and not bool(sig[1, 0])  # identical forecasts: undefined test
    rmse_a = np.sqrt(((pred_a - truth) ** 2).mean(0))
    np.testing.assert_allclose(out.metric_a.sel(variable="2m_temperature").values, rmse_a)
    assert out.significant.dtype == bool and out.attrs["n_time"] == T
    w = runs.skill_difference(a, b, "rmse", test="wilcoxon", correction="fdr_bh")
    assert bool(w.significant.sel(variable="2m_temperature")[0, 0])
    # runs on disk: run directories with fields.nc
    for name, ds in (("a", a), ("b", b)):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"task": "downscaling", "method": name, "seed": 0}))
        ds.to_netcdf(d / "fields.nc")
    on_disk = runs.skill_difference(runs.open(tmp_path / "a"), tmp_path / "b")
    np.testing.assert_allclose(on_disk.difference.values, out.difference.values)
    skill = runs.open(tmp_path / "a").skill
    np.testing.assert_allclose(skill["2m_temperature_rmse"].values, rmse_a, rtol=1e-6)


def test_skill_difference_default_test_allows_for_autocorrelation() -> None:
    """The default is the AR(1) t-test: recorded in the attrs with n_eff; on slowly varying
    (autocorrelated) error differences its p-values exceed the plain t-test's."""
    from scipy.stats import ttest_rel

    from wpeft.metrics.significance import paired_ttest_ar1

    rng = np.random.default_rng(5)
    T = 60
    truth = rng.normal(280, 5, (T, 2, 3))
    drift = np.cumsum(rng.normal(0, 0.3, (T, 2, 3)), axis=0)  # slowly varying error of A
    a, b = _fields(truth + 1.0 + drift, truth), _fields(truth + rng.normal(0, 1.0, (T, 2, 3)), truth)
    out = runs.skill_difference(a, b, "rmse")
    assert out.attrs["test"] == "ttest_ar1"
    assert out.attrs["test_name"] == "paired t-test with AR(1) effective sample size"
    assert "AR(1)" in out.significant.attrs["long_name"]
    sq_a, sq_b = ((truth + 1.0 + drift - truth) ** 2), (b["2m_temperature"] - truth).values ** 2
    expected = paired_ttest_ar1(sq_a, sq_b)
    np.testing.assert_allclose(out.p_value.sel(variable="2m_temperature"), expected.pvalue)
    np.testing.assert_allclose(out.n_eff.sel(variable="2m_temperature"), expected.n_eff)
    assert out.attrs["n_eff_median"] == pytest.approx(float(np.median(expected.n_eff)))
    assert out.attrs["n_eff_min"] < out.attrs["n_eff_median"] < T
    plain = runs.skill_difference(a, b, "rmse", test="ttest")
    assert plain.attrs["test"] == "ttest" and "n_eff" not in plain and "n_eff_median" not in plain.attrs
    np.testing.assert_allclose(plain.p_value.sel(variable="2m_temperature"),
                               ttest_rel(sq_a, sq_b).pvalue)
    assert bool((out.p_value > plain.p_value).all())
    with pytest.raises(ConfigError, match="ttest_ar1"):
        runs.skill_difference(a, b, test="bootstrap")


def test_domain_mean_losses_and_forecast_leads() -> None:
    """Per-time latitude-weighted domain means (their time mean squared-rooted is the RMSE
    score); forecast leads are flattened like the summary scores (``<var>_<hours>h``)."""
    from wpeft.metrics import rmse
    from wpeft.runs.skill import domain_mean_losses

    rng = np.random.default_rng(2)
    truth = rng.normal(size=(6, 2, 3))
    pred = truth + rng.normal(size=(6, 2, 3))
    a = _fields(pred, truth, lat=(60.0, 0.0))
    mse = domain_mean_losses(a, "rmse")["2m_temperature"]
    w = np.cos(np.deg2rad([60.0, 0.0]))
    by_hand = (((pred - truth) ** 2) * (w / w.mean())[None, :, None]).mean(axis=(1, 2))
    np.testing.assert_allclose(mse.values, by_hand)
    assert mse.dims == ("time",) and (mse["time"] == a["time"]).all()
    # NaN entries are left out of a time's mean (xarray's weighted mean); an all-NaN time: NaN
    holes = pred.copy()
    holes[0] = np.nan
    holes[1, 0, 0] = np.nan
    gappy = domain_mean_losses(_fields(holes, truth, lat=(60.0, 0.0)), "rmse")["2m_temperature"]
    assert np.isnan(gappy.values[0])
    err2 = (holes[1] - truth[1]) ** 2
    ww = np.broadcast_to((w / w.mean())[:, None], err2.shape)
    ok = ~np.isnan(err2)
    assert gappy.values[1] == pytest.approx((err2[ok] * ww[ok]).sum() / ww[ok].sum())
    np.testing.assert_allclose(gappy.values[2:], by_hand[2:])
    assert float(np.sqrt(mse.mean())) == pytest.approx(
        float(rmse(a["2m_temperature"], a["2m_temperature_target"])))
    leads = np.array([6, 12], dtype="timedelta64[h]").astype("timedelta64[ns]")
    stacked = xr.concat([a, a + 1], dim=xr.DataArray(leads, dims="prediction_timedelta"))
    losses = domain_mean_losses(stacked, "mae")
    assert sorted(losses) == ["2m_temperature_12h", "2m_temperature_6h"]
    np.testing.assert_allclose(losses["2m_temperature_6h"], domain_mean_losses(a, "mae")["2m_temperature"])
    diff = runs.skill_difference(stacked, stacked, "rmse", variables="2m_temperature")
    assert list(diff.variable.values) == ["2m_temperature_6h", "2m_temperature_12h"]


def test_skill_difference_refuses_other_grids_and_times() -> None:
    rng = np.random.default_rng(1)
    truth = rng.normal(size=(5, 2, 3))
    a = _fields(truth + 1, truth)
    with pytest.raises(DataError, match="latitude"):
        runs.skill_difference(a, _fields(truth, truth, lat=(20.0, -20.0)))
    later = np.datetime64("2001-01-01T00", "ns") + np.arange(5) * np.timedelta64(6, "h")
    with pytest.raises(DataError, match="time"):
        runs.skill_difference(a, _fields(truth, truth, times=later))
    with pytest.raises(DataError, match="share no variable"):
        runs.skill_difference(a, a, "crps")
