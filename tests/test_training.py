"""The training loop and the comparison: run directories, resume equivalence, bad input."""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr
from killing import train_killed_during_step
from safetensors.torch import load_file

from wpeft.distributed.runtime import DistEnv
from wpeft.errors import CheckpointError, ConfigError, DataError
from wpeft.methods.sfas import FishMask, MaskedAdamW
from wpeft.tasks import create_task
from wpeft.tasks.downscaling import Downscaling
from wpeft.training.compare import CompareConfig, collect, compare, tables, write_tables
from wpeft.training.loop import (
    TrainConfig,
    TrainingDiverged,
    _epoch_seed,
    _pack_bools,
    _prepare_static_selection,
    _unpack_bools,
    prepare_run,
    train,
)

WORLD = {"nlat": 16, "nlon": 32, "days": 12, "spinup_days": 1, "ensemble_inits": 8, "ensemble_members": 3}


@pytest.fixture(autouse=True)
def small_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WPEFT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "world-cache"))


def config(**kw) -> TrainConfig:
    base = {
        "task": "downscaling", "method": "weatherpeft", "steps": 4, "batch_size": 2,
        "warmup_steps": 1, "checkpoint_every": 2, "task_options": {"world": WORLD},
        "device": "cpu",
    }
    return TrainConfig(**{**base, **kw})


def test_run_directory_holds_everything(tmp_path) -> None:
    summary = train(config(budget=0.04), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    for name in ("config.json", "summary.json", "adapter.safetensors", "adapter.json", "fields.nc", "checkpoint.pt"):
        assert (run / name).exists(), name
    assert summary["encoder_decoder_policy"] == "frozen"
    # target and achieved, and WeatherPEFT's split (TADP at the task's 30 prompts, then SFAS)
    written = json.loads((run / "summary.json").read_text())
    match = written["budget_match"]
    assert written["budget"] == match["target"] == 0.04 and match["knob"] == "keep_ratio"
    assert match["achieved"] == pytest.approx(0.04, abs=1e-6) == written["budget_fraction"]
    assert written["num_prompts"] == 30 and written["budget_split"] == match["split"]
    assert sum(match["split"].values()) == pytest.approx(match["achieved"], abs=1e-15)
    t, c = summary["trainable"], summary["changed"]
    assert c["encoder"] == c["decoder"] == 0 and 0 < c["backbone"] <= 4 * t["backbone"]
    fields = xr.open_dataset(run / "fields.nc")
    assert "2m_temperature_target" in fields and fields.sizes["latitude"] == 16
    assert all(k.startswith(("rmse/", "rmse_bilinear/")) for k in summary["scores"])
    with pytest.raises(ConfigError, match="already holds a finished run"):
        train(config(budget=0.04), run, progress=False)


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, monkeypatch) -> None:
    cfg = config(steps=5, checkpoint_every=2)
    full = train(cfg, tmp_path / "full", progress=False)

    train_killed_during_step(monkeypatch, cfg, tmp_path / "killed", 4)  # after the step-2 checkpoint
    resumed = train(cfg, tmp_path / "killed", resume=True, progress=False)

    a = load_file(str(tmp_path / "full" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["scores"] == full["scores"]
    assert resumed["changed"] == full["changed"]


def test_resume_refuses_another_config(tmp_path) -> None:
    train(config(steps=2), tmp_path / "r", progress=False)
    (tmp_path / "r" / "summary.json").unlink()
    with pytest.raises(CheckpointError, match="another config"):
        train(config(steps=2, seed=1), tmp_path / "r", resume=True, progress=False)
    (tmp_path / "r" / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        train(config(steps=2), tmp_path / "r", resume=True, progress=False)


def test_bad_settings() -> None:
    with pytest.raises(ConfigError, match="budget 1.5 is out of range"):
        TrainConfig(budget=1.5)
    with pytest.raises(ConfigError, match="steps"):
        TrainConfig(steps=0)


def test_bool_packing_round_trip() -> None:
    masks = {"m": [torch.rand(3, 7) > 0.5, torch.zeros(0, dtype=torch.bool), torch.rand(9) > 0.2]}
    packed = _pack_bools(masks)
    assert packed["m"][0]["packed_bits"].numel() == 3  # 21 bits -> 3 bytes
    back = _unpack_bools(packed)
    assert all(torch.equal(x, y) for x, y in zip(masks["m"], back["m"]))


def test_compare_writes_tables_and_resumes(tmp_path) -> None:
    cfg = CompareConfig(
        tasks=("downscaling",), methods=("bitfit", "full"), budgets=(None,), seeds=(0, 1),
        steps=2, batch_size=2, task_options={"downscaling": {"world": WORLD}},
    )
    summaries = compare(cfg, tmp_path, progress=False)
    assert len(summaries) == 4
    before = (tmp_path / "downscaling" / "full-default-s0" / "summary.json").stat().st_mtime
    compare(cfg, tmp_path, progress=False)  # finished cells are not re-run
    assert (tmp_path / "downscaling" / "full-default-s0" / "summary.json").stat().st_mtime == before
    results = collect(tmp_path)
    assert results.sizes == {"task": 1, "method": 2, "budget": 1, "seed": 2}
    table = tables(results)["downscaling"]
    assert "| full | default | 2 |" in table and "±" in table
    header, _, *rows = table.splitlines()
    assert header.startswith(
        "| method | budget | seeds | k % (per step) | changed % (union) | adapter MB (% of full) |"
    )
    for method in ("bitfit", "full"):
        runs = [tmp_path / "downscaling" / f"{method}-default-s{s}" for s in (0, 1)]
        saved = [json.loads((r / "summary.json").read_text()) for r in runs]
        for r, summary in zip(runs, saved):  # the sizes each run recorded
            assert summary["adapter_bytes"] == (r / "adapter.safetensors").stat().st_size
            changed = summary["changed"]["total"] - summary["changed"]["head"]
            assert summary["changed_fraction"] == changed / summary["backbone_parameters"]
        cell = results.sel({"method": method, "budget": "default", "task": "downscaling"})
        assert list(cell["changed_percent"].values) == [100 * x["changed_fraction"] for x in saved]
        assert list(cell["adapter_bytes"].values) == [x["adapter_bytes"] for x in saved]
        assert list(cell["adapter_percent"].values) == pytest.approx(
            [100 * x["adapter_bytes"] / x["full_checkpoint_bytes"] for x in saved], rel=1e-12
        )
        def cell_text(values: list[float]) -> str:  # one value if the seeds agree
            if values[0] == values[1]:
                return f"{values[0]:.4g}"
            return f"{np.mean(values):.4g} ± {np.std(values):.2g}"

        k, union, mb, percent = (
            cell_text([scale * x[key] for x in saved])
            for key, scale in (("budget_fraction", 100), ("changed_fraction", 100),
                               ("adapter_bytes", 1e-6), ("adapter_fraction", 100))
        )
        row = next(r for r in rows if r.startswith(f"| {method} |")).split(" | ")
        assert row[3:6] == [k, union, f"{mb} ({percent}%)"]
    # Full-Tuning stores the whole backbone (and encoder, decoder and head): over 100 % of it
    assert results["adapter_percent"].sel({"method": "full"}).min() > 100
    assert results["adapter_percent"].sel({"method": "bitfit"}).max() < 5
    rmse = results["rmse:2m_temperature"].sel({"method": "bitfit"}).values.ravel()
    expected = [json.loads((tmp_path / "downscaling" / f"bitfit-default-s{s}" / "summary.json").read_text())["scores"]["rmse/2m_temperature"] for s in (0, 1)]
    assert list(rmse) == expected


def _summary(method: str, seed: int, **sizes) -> dict:
    """A finished run's summary.json with the counts the size columns are made from."""
    return {
        "task": "downscaling", "method": method, "budget": 0.04, "seed": seed,
        "scores": {"rmse/2m_temperature": 1.0 + seed},
        "budget_fraction": 0.04, "backbone_parameters": 1000,
        "changed": {"head": 5, "total": 5 + sizes.pop("changed")}, **sizes,
    }


def test_compare_tables_show_the_three_sizes_by_hand(tmp_path) -> None:
    cells = {
        # seeds that agree on every size: one value
        "sfas-4pct-s0": _summary("sfas", 0, changed=300, adapter_bytes=2_000_000,
                                 full_checkpoint_bytes=4_000_000),
        "sfas-4pct-s1": _summary("sfas", 1, changed=300, adapter_bytes=2_000_000,
                                 full_checkpoint_bytes=4_000_000),
        # seeds that differ: mean ± std (population std, as for the scores)
        "fish-4pct-s0": _summary("fish", 0, changed=100, adapter_bytes=1_000_000,
                                 full_checkpoint_bytes=4_000_000),
        "fish-4pct-s1": _summary("fish", 1, changed=300, adapter_bytes=3_000_000,
                                 full_checkpoint_bytes=4_000_000),
        # written before the sizes were recorded: no full checkpoint bytes, no backbone count
        "lora-4pct-s0": {k: v for k, v in _summary("lora", 0, changed=40, adapter_bytes=500_000)
                         .items() if k != "backbone_parameters"},
    }
    for name, summary in cells.items():
        run = tmp_path / "downscaling" / name
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps(summary))
    results = collect(tmp_path)
    assert results["adapter_bytes"].attrs["units"] == "B"
    assert results["changed_percent"].sel({"method": "fish", "budget": "4%"}).values.ravel().tolist() == [
        10.0, 30.0
    ]
    lines = tables(results)["downscaling"].splitlines()
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[3:6] for line in lines[2:]}
    assert rows["sfas"] == ["4", "30", "2 (50%)"]
    assert rows["fish"] == ["4", "20 ± 10", "2 ± 1 (50 ± 25%)"]
    assert rows["lora"] == ["4", "-", "0.5"]
    assert lines[1] == "|---" * 7 + "|"
    out = tmp_path / "tables"
    write_tables(results, out)
    back = xr.open_dataset(out / "comparison.nc")
    assert back["adapter_percent"].sel({"method": "fish", "task": "downscaling"}).values.ravel().tolist() == [
        25.0, 75.0
    ]
    back.close()
    csv = (out / "downscaling.csv").read_text().splitlines()[0].split(",")
    assert {"budget_percent", "changed_percent", "adapter_bytes", "adapter_percent"} <= set(csv)


def test_compare_cells_carry_the_record_interval() -> None:
    cells = CompareConfig(methods=("weatherpeft", "full"), steps=30, record_every=3).cells()
    assert [(c.method, c.steps, c.record_every) for c in cells] == [
        ("weatherpeft", 30, 3), ("full", 30, 3)
    ]
    assert CompareConfig().cells()[0].record_every == TrainConfig().record_every


def test_compare_cells_take_each_methods_default_lr() -> None:
    cells = CompareConfig(methods=("weatherpeft", "full", "lora")).cells()
    assert [(c.method, c.lr) for c in cells] == [("weatherpeft", 1e-3), ("full", 3e-4), ("lora", 1e-3)]
    assert {c.lr for c in CompareConfig(methods=("weatherpeft", "full"), lr=5e-4).cells()} == {5e-4}

@pytest.mark.parametrize("method", ["child_tuning_d", "fish", "sfas", "lora", "vpt", "ssf"])
def test_every_kind_of_method_trains_through_the_loop(tmp_path, method: str) -> None:
    summary = train(config(method=method, steps=2, checkpoint_every=0), tmp_path / method, progress=False)
    assert summary["method"] == method and summary["changed"]["total"] > 0


def _batch_size(batch) -> int:
    return next(iter(batch.targets.values())).shape[0]


def test_child_tuning_fisher_is_one_pass_over_the_training_split(tmp_path, monkeypatch) -> None:
    """fisher_batches=None: every training batch once, at the run's batch size, then training."""
    sizes: list[int] = []
    real_loss = Downscaling.loss

    def counting_loss(self, prediction, batch):
        sizes.append(_batch_size(batch))
        return real_loss(self, prediction, batch)

    monkeypatch.setattr(Downscaling, "loss", counting_loss)
    cfg = config(method="child_tuning_d", steps=1, checkpoint_every=0)
    summary = train(cfg, tmp_path / "r", progress=False)
    n = create_task("downscaling", world=WORLD).num_samples("train")
    assert n == 33  # 16 batches of 2 and a last one of 1
    assert sizes == [2] * 16 + [1] + [2]  # the Fisher pass, then the one training step
    assert summary["selection"]["fisher_batches_used"] == 17


def test_fish_fisher_in_the_loop_is_per_example_over_the_first_samples() -> None:
    """The loop gives FISH one-sample batches in the first epoch's order; its Fisher equals a
    hand loop of per-example squared gradients over the first fisher_samples of them."""
    cfg = config(method="fish", method_options={"fisher_samples": 3})
    model, task, method, _, _ = prepare_run(cfg)
    plan = method.preparation(task.num_samples("train"), cfg.batch_size)
    assert (plan.batch_size, plan.batches) == (1, 3)
    seen: dict[str, Any] = {}
    real_fisher = method.fisher

    def spy(loss_fn, batches=None, n_batches=None):
        sizes = []

        def loss(batch):
            sizes.append(_batch_size(batch))
            return loss_fn(batch)

        scores, used = real_fisher(loss, batches, n_batches)
        seen.update(scores=[s.clone() for s in scores], sizes=sizes)
        return scores, used

    method.fisher = spy
    _prepare_static_selection(method, plan, task, model, cfg, torch.device("cpu"), DistEnv(),
                              progress=False)
    assert seen["sizes"] == [1, 1, 1]
    assert method.selection.prepared == {"fisher_samples_used": 3}
    params = method.selection.params
    hand = [torch.zeros_like(p) for p in params]
    for batch in itertools.islice(task.batches("train", 1, seed=_epoch_seed(cfg, 0)), 3):
        for p in method.parameters():
            p.grad = None
        task.loss(task.predict(model, batch), batch).backward()
        for h, p in zip(hand, params):
            h.add_(p.grad.pow(2))
    for h, ours in zip(hand, method.selection.layout.split(seen["scores"])):
        torch.testing.assert_close(ours, h / 3, rtol=1e-6, atol=1e-6)


def test_static_mask_settings_are_checked_before_the_run_directory(tmp_path) -> None:
    cfg = config(method="child_tuning_d", method_options={"fisher_batches": 18})
    with pytest.raises(ConfigError, match="fisher_batches=18 is more than the 17 batches"):
        train(cfg, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="method 'fish': setting fisher_batches=8 no longer "
                                          "exists.*fisher_samples.*cannot be resumed"):
        config(method="fish", method_options={"fisher_batches": 8})


def test_a_resumed_static_mask_run_keeps_its_mask_and_record(tmp_path, monkeypatch) -> None:
    """A resume takes the mask (and what its Fisher used) from the checkpoint; no second pass."""
    cfg = config(method="fish", method_options={"fisher_samples": 4}, steps=3, checkpoint_every=1)
    full = train(cfg, tmp_path / "full", progress=False)
    train_killed_during_step(monkeypatch, cfg, tmp_path / "killed", 3)  # after the step-2 checkpoint

    def no_second_pass(*args, **kwargs):
        raise AssertionError("a resumed run selected its static mask again")

    monkeypatch.setattr(FishMask, "prepare", no_second_pass)
    resumed = train(cfg, tmp_path / "killed", resume=True, progress=False)
    assert resumed["selection"] == full["selection"]
    assert resumed["selection"]["fisher_samples_used"] == 4
    assert resumed["scores"] == full["scores"] and resumed["changed"] == full["changed"]


def test_unknown_method_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="Unknown method 'nope'"):
        train(config(method="nope"), tmp_path / "x", progress=False)


def _poison_after(monkeypatch, calls: int) -> None:
    """The optimiser's ``calls``-th step writes NaN into a trained tensor (a diverging update)."""
    real_step = MaskedAdamW.step
    count = {"n": 0}

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        count["n"] += 1
        if count["n"] == calls:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(MaskedAdamW, "step", step)


def test_divergence_keeps_the_last_finite_checkpoint_and_resumes_with_a_lower_lr(
    tmp_path, monkeypatch
) -> None:
    cfg = config(steps=6, checkpoint_every=2)
    _poison_after(monkeypatch, 3)  # step 3's update is non-finite; step 2 was checkpointed
    with pytest.raises(TrainingDiverged, match="the last finite checkpoint, step 2, is in"):
        train(cfg, tmp_path / "r", progress=False)
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2
    tensors = [v for v in state["adapter"].values() if torch.is_tensor(v) and v.is_floating_point()]
    assert tensors and all(torch.isfinite(v).all() for v in tensors)
    monkeypatch.undo()

    seen: dict[str, float] = {}

    def lr_of(method, env, opt) -> None:
        seen["initial_lr"] = opt.param_groups[0]["initial_lr"]

    lower = config(steps=6, checkpoint_every=2, lr=2.5e-4)
    summary = train(lower, tmp_path / "r", resume=True, progress=False, on_trained=lr_of)
    assert seen["initial_lr"] == pytest.approx(2.5e-4)
    assert summary["resumes"] == [{"step": 2, "changed": {"lr": [1e-3, 2.5e-4]}}]
    assert json.loads((tmp_path / "r" / "config.json").read_text())["lr"] == 2.5e-4


def test_divergence_before_the_first_checkpoint_says_so(tmp_path, monkeypatch) -> None:
    _poison_after(monkeypatch, 1)
    with pytest.raises(TrainingDiverged, match="no checkpoint was written before"):
        train(config(steps=6, checkpoint_every=4), tmp_path / "r", progress=False)
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_an_unfinished_run_is_kept_unless_resume_or_overwrite(tmp_path, monkeypatch) -> None:
    run = tmp_path / "r"
    _poison_after(monkeypatch, 3)
    with pytest.raises(TrainingDiverged):
        train(config(steps=4), run, progress=False)
    monkeypatch.undo()
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(ConfigError, match="holds an unfinished run; give --resume"):
        train(config(steps=4, method="lora"), run, progress=False)
    assert (run / "checkpoint.pt").read_bytes() == before
    (run / "records" / "stale.txt").write_text("from the old run")
    summary = train(config(steps=2, method="lora"), run, overwrite=True, progress=False)
    assert summary["method"] == "lora" and summary["resumes"] == []
    assert not (run / "records").exists(), "the old run's records went with it"
    assert not list(tmp_path.glob(".r.old-*")), "the renamed-aside copy is removed"


def test_sigint_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(
    tmp_path, monkeypatch, capsys
) -> None:
    import os
    import signal

    from wpeft.cli import main

    args = ["train", "--task", "downscaling", "--method", "weatherpeft", "--steps", "4",
            "--batch-size", "2", "--checkpoint-every", "0", "--device", "cpu", "--quiet",
            "--task-option", "world=" + json.dumps(WORLD)]
    real_step = MaskedAdamW.step
    count = {"n": 0}

    def interrupted_step(self, *a, **kw):
        count["n"] += 1
        if count["n"] == 2:  # Ctrl-C during step 2: training stops after it
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *a, **kw)

    monkeypatch.setattr(MaskedAdamW, "step", interrupted_step)
    assert main([*args, "--out", str(tmp_path / "cut")]) == 130
    err = capsys.readouterr().err
    assert "stopped by SIGINT at step 2 of 4" in err and err.strip().endswith("--resume")
    assert "Traceback" not in err
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "handler restored"
    monkeypatch.undo()
    assert main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    a = load_file(str(tmp_path / "full" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prefetched_batches_keep_their_order_and_raise_where_taken() -> None:
    from wpeft.training.loop import _prefetched

    def items():
        yield from range(5)
        raise DataError("store went away")

    it = _prefetched(items())
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match="went away"):
        next(it)
    assert list(_prefetched(iter(()))) == []


def test_task_statistics_are_written_beside_the_run_and_not_recomputed_on_resume(
    tmp_path, monkeypatch
) -> None:
    """Precipitation's training-period statistics (tp mean and std) are computed once, written
    to ``task-statistics.json`` before training, and read back by ``--resume``."""
    import wpeft.tasks.precipitation as precipitation
    from wpeft.runs.layout import RunLayout

    run = tmp_path / "run"
    world = {**WORLD, "days": 24}  # precipitation's samples span 48 h: a longer record
    cfg = config(task="precipitation", method="bitfit", steps=2, checkpoint_every=1,
                 task_options={"world": world})
    summary = train(cfg, run, progress=False)
    stats = json.loads(RunLayout(run).task_statistics.read_text())
    assert set(stats) == {"tp"} and stats["tp"]["std"] > 0
    assert list(summary["task_config"]["leads_hours"]) == [12, 24, 36]

    def refuse(*args, **kwargs):
        raise AssertionError("the statistics were computed again")

    monkeypatch.setattr(precipitation, "_mean_std", refuse)
    RunLayout(run).summary.unlink()  # as if killed after its last checkpoint
    resumed = train(dataclasses.replace(cfg, steps=3), run, progress=False, resume=True)
    assert resumed["steps"] == 3
    assert json.loads(RunLayout(run).task_statistics.read_text()) == stats


def _fake_cell(root, method: str, seed: int, truth, pred) -> None:
    """A finished downscaling run directory: summary.json (RMSE score) and fields.nc."""
    import numpy as np

    d = root / "downscaling" / f"{method}-default-s{seed}"
    d.mkdir(parents=True)
    T, H, W = truth.shape
    coords = {
        "time": np.datetime64("2000-01-01T00", "ns") + np.arange(T) * np.timedelta64(6, "h"),
        "latitude": np.linspace(60.0, -60.0, H), "longitude": np.arange(W) * 360.0 / W,
    }
    dims = ("time", "latitude", "longitude")
    xr.Dataset(
        {"2m_temperature": (dims, pred, {"units": "K"}), "2m_temperature_target": (dims, truth)},
        coords=coords,
    ).to_netcdf(d / "fields.nc")
    score = float(np.sqrt(((pred - truth) ** 2).mean()))
    (d / "summary.json").write_text(json.dumps({
        "task": "downscaling", "method": method, "budget": None, "seed": seed,
        "scores": {"rmse/2m_temperature": score}, "budget_fraction": 0.01,
    }))


def test_compare_tables_mark_significant_differences_from_the_reference(tmp_path) -> None:
    """LoRA, far worse than Full-Tuning, is marked; BitFit, identical to it, is not; VPT's mark
    follows the AR(1) t-test of the seed-averaged domain-mean squared errors per time."""
    import numpy as np

    from wpeft.metrics.significance import paired_ttest_ar1
    from wpeft.training.compare import MARKER, reference_marks

    rng = np.random.default_rng(0)
    T, H, W = 30, 4, 8
    truth = rng.normal(280, 5, (T, H, W))
    w = np.cos(np.deg2rad(np.linspace(60.0, -60.0, H)))
    mse = {}
    for seed in (0, 1):
        full = truth + rng.normal(0, 1.0, (T, H, W))
        vpt = truth + rng.normal(0, 1.05, (T, H, W))
        for method, pred in (("full", full), ("bitfit", full.copy()), ("vpt", vpt),
                             ("lora", truth + rng.normal(0, 3.0, (T, H, W)))):
            _fake_cell(tmp_path, method, seed, truth, pred)
            e2 = ((pred - truth) ** 2 * (w / w.mean())[None, :, None]).mean(axis=(1, 2))
            mse.setdefault(method, []).append(e2)
    results = collect(tmp_path)
    assert results.attrs["root"] == str(tmp_path.resolve())
    table = tables(results)["downscaling"]
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert f"{MARKER} |" in rows["lora"] and MARKER not in rows["bitfit"] + rows["full"]
    assert "| lora | default | 2 |" in rows["lora"]  # the structure is kept
    assert table.splitlines()[-2] == ""  # one line under the table says what the marker means
    assert table.splitlines()[-1].startswith(
        f"Scores marked {MARKER} differ from full's at p < 0.05 (paired t-test with AR(1) "
        "effective sample size")
    # seeds paired and averaged per time, then the AR(1) test on the domain means
    p = float(paired_ttest_ar1(np.mean(mse["vpt"], axis=0), np.mean(mse["full"], axis=0)).pvalue)
    column = ["rmse:2m_temperature"]
    assert reference_marks(results, "downscaling", column, "full", alpha=p * 1.001)[0] == {
        ("lora", "default", "rmse:2m_temperature"): MARKER,
        ("vpt", "default", "rmse:2m_temperature"): MARKER,
    }
    assert ("vpt", "default", column[0]) not in reference_marks(
        results, "downscaling", column, "full", alpha=p * 0.999)[0]
    # no reference in the matrix (or none asked for): the plain table, no error
    plain = tables(results, reference="dora")["downscaling"]
    assert MARKER not in plain and plain == tables(results, reference=None)["downscaling"]
    assert table.replace(MARKER, "").splitlines()[:-2] == plain.splitlines()


def test_compare_tables_flag_differences_too_autocorrelated_to_test(tmp_path) -> None:
    """A method whose error swings slowly over the test times has loss differences with lag-1
    autocorrelation near 1: the AR(1) effective sample size is below 1, the t-test has no degrees
    of freedom, and the cell says so (UNTESTABLE) instead of passing as not significant."""
    import numpy as np

    from wpeft.metrics.significance import ar1_effective_sample_size
    from wpeft.training.compare import MARKER, UNTESTABLE, reference_marks

    rng = np.random.default_rng(1)
    T, H, W = 30, 4, 8
    truth = rng.normal(280, 5, (T, H, W))
    full = truth + rng.normal(0, 0.1, (T, H, W))
    offset = 4.0 + 2.0 * np.sin(2 * np.pi * np.arange(T) / T)  # one slow swing over the period
    drift = truth + offset[:, None, None]
    _fake_cell(tmp_path, "full", 0, truth, full)
    _fake_cell(tmp_path, "lora", 0, truth, drift)
    w = np.cos(np.deg2rad(np.linspace(60.0, -60.0, H)))[None, :, None]
    d = (((drift - truth) ** 2 - (full - truth) ** 2) * w / w.mean()).mean(axis=(1, 2))
    assert float(ar1_effective_sample_size(d, axis=0)) <= 1  # by hand: the premise holds
    results = collect(tmp_path)
    marks, note = reference_marks(results, "downscaling", ["rmse:2m_temperature"], "full")
    assert marks == {("lora", "default", "rmse:2m_temperature"): UNTESTABLE}
    assert f"{UNTESTABLE}: not testable" in note
    table = tables(results)["downscaling"]
    assert f"{UNTESTABLE} |" in table and f"{MARKER} |" not in table
