"""Data-parallel training on CPU (gloo, 2 processes): a 2-rank run equals a 1-rank run with the
same global batch; the SFAS mask is identical on every rank; bad layouts are refused."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_training import WORLD, small_cache  # noqa: F401  (small_cache: autouse fixture)
from test_training import config as single_config

from wpeft.distributed.runtime import DistEnv
from wpeft.distributed.strategy import resolve_strategy
from wpeft.errors import ConfigError
from wpeft.methods import METHODS, create_method
from wpeft.training.loop import TrainConfig, train


def config(**kw) -> TrainConfig:
    """The training tests' config with a global batch of 4 (2 per rank) and lr 1e-3."""
    return single_config(**{"batch_size": 4, "lr": 1e-3, **kw})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state_numel(opt) -> int:
    """Scalars of optimiser state this process holds (its local shard under ZeRO)."""
    local = getattr(opt, "optim", opt)
    return sum(v.numel() for s in local.state.values() for v in s.values() if torch.is_tensor(v))


def _mask_digest(method, env, opt) -> None:
    """Each rank writes a digest of its selection masks (empty for dense methods), the size of
    the optimiser state it holds, and what its selection holds (sharded or not, entries)."""
    out_dir = Path(os.environ["WPEFT_TEST_OUT"])
    (out_dir / f"state-rank{env.rank}.txt").write_text(str(_state_numel(opt)))
    h = hashlib.sha256()
    sel = method.selection
    masks = dict(zip(sel.names, sel.masks)) if sel is not None and sel.masks is not None else {}
    for name, mask in sorted(masks.items()):
        h.update(name.encode())
        h.update(mask.to(torch.uint8).numpy().tobytes())
    (out_dir / f"mask-rank{env.rank}.txt").write_text(h.hexdigest())
    if sel is not None:
        held = {"sharded": sel.sharded, "k": sel.k, "selected": sum(sel.counts()),
                "entries": sum(m.numel() for m in sel.masks), "total": sel.total}
        (out_dir / f"selection-rank{env.rank}.json").write_text(json.dumps(held))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One-process runs shared by the tests of this module, keyed by config:
    ``reference(cfg) -> (run dir, summary, optimiser-state scalars)``."""
    runs: dict[str, tuple[Path, dict, int]] = {}

    def run(cfg: TrainConfig) -> tuple[Path, dict, int]:
        key = json.dumps(cfg.to_dict(), sort_keys=True)
        if key not in runs:
            out = tmp_path_factory.mktemp("one") / "run"
            state = {}
            summary = train(cfg, out, progress=False,
                            on_trained=lambda m, e, opt: state.setdefault("n", _state_numel(opt)))
            runs[key] = (out, summary, state["n"])
        return runs[key]

    return run


def _worker(
    rank: int, world: int, port: int, cfg: dict, run_dir: str, out: str, resume: bool, die_at: int
) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WPEFT_TEST_OUT=out,
    )
    torch.set_num_threads(1)
    if die_at:  # a crash of every rank during optimiser step ``die_at`` (1-based)
        calls = {"n": 0}

        def die(opt, args, kwargs):
            calls["n"] += 1
            if calls["n"] == die_at:
                raise RuntimeError("killed")

        from torch.optim.optimizer import register_optimizer_step_pre_hook

        register_optimizer_step_pre_hook(die)
    try:
        train(TrainConfig.from_dict(cfg), run_dir, progress=False, resume=resume,
              on_trained=_mask_digest)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_ranks(
    cfg: TrainConfig, run_dir: Path, world: int = 2, resume: bool = False, die_at: int = 0
) -> Path:
    out = run_dir.parent / f"{run_dir.name}-ranks"
    out.mkdir(parents=True, exist_ok=True)
    mp.start_processes(
        _worker, args=(world, _free_port(), cfg.to_dict(), str(run_dir), str(out), resume, die_at),
        nprocs=world, join=True, start_method="spawn",
    )
    return out


def compare_adapters(a: Path, b: Path, atol: float) -> float:
    """Largest absolute difference between two runs' adapter tensors (same keys required)."""
    ta, tb = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert ta.keys() == tb.keys()
    worst = 0.0
    for k in ta:
        if ta[k].is_floating_point():
            worst = max(worst, float((ta[k] - tb[k]).abs().max()))
        else:  # SFAS indices: the same entries were selected
            assert torch.equal(ta[k], tb[k]), k
    assert worst <= atol, worst
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("method,budget", [("full", None), ("lora", 0.04), ("weatherpeft", 0.04)])
def test_two_rank_ddp_equals_one_rank(tmp_path, reference, method, budget) -> None:
    cfg = config(method=method, budget=budget, lr=METHODS[method].default_lr)
    one_dir, one, _ = reference(cfg)
    out = run_ranks(cfg, tmp_path / "two")
    two = json_load(tmp_path / "two" / "summary.json")
    assert two["world_size"] == 2 and two["strategy"] == "ddp"
    # Same global batch, same data order, gradients all-reduced: the same training up to
    # float rounding of the mean over two halves (stated tolerance: 1e-4 on any weight after
    # four Adam steps of lr <= 1e-3).
    compare_adapters(one_dir, tmp_path / "two", atol=1e-4)
    for key, value in one["scores"].items():
        assert two["scores"][key] == pytest.approx(value, rel=1e-4), key
    assert two["trainable"] == one["trainable"]
    if method == "weatherpeft":
        digests = {p.read_text() for p in out.glob("mask-rank*.txt")}
        assert len(list(out.glob("mask-rank*.txt"))) == 2 and len(digests) == 1


def json_load(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.slow
def test_two_rank_run_resumes_on_one_rank(tmp_path, reference) -> None:
    """A checkpoint written by a 2-rank run (world-size independent: full adapter tensors and the
    global data position) continues on one rank to the uninterrupted result."""
    cfg = config(method="lora", budget=0.04, steps=4, checkpoint_every=2)
    ref_dir = reference(cfg)[0]
    with pytest.raises(mp.ProcessRaisedException, match="killed"):
        run_ranks(cfg, tmp_path / "killed", die_at=3)  # after the step-2 checkpoint
    state = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 2
    assert not (tmp_path / "killed" / "summary.json").exists()
    train(cfg, tmp_path / "killed", resume=True, progress=False)
    compare_adapters(ref_dir, tmp_path / "killed", atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,budget",
    [("full", None), ("lora", 0.04), ("tadp", 0.04), ("weatherpeft", 0.04), ("fish", 0.01)],
)
def test_two_rank_fsdp2_equals_one_rank(tmp_path, reference, method, budget) -> None:
    """FSDP2 (``fully_shard`` per Swin block, gloo on CPU) trains like one process; for the
    selection methods the global top-k over the shards selects the same entries (SFAS: with
    the annealed noise of each entry as in one process; FISH: a static mask)."""
    cfg = config(method=method, budget=budget, lr=METHODS[method].default_lr)
    one_dir, one, _ = reference(cfg)
    out = run_ranks(config(method=method, budget=budget, lr=cfg.lr, strategy="fsdp"),
                    tmp_path / "two")
    two = json_load(tmp_path / "two" / "summary.json")
    assert two["world_size"] == 2 and two["strategy"] == "fsdp"
    compare_adapters(one_dir, tmp_path / "two", atol=1e-4)
    for key, value in one["scores"].items():
        assert two["scores"][key] == pytest.approx(value, rel=1e-4), key
    assert two["trainable"] == one["trainable"]
    if method in ("weatherpeft", "fish"):  # changed entries lie inside the same masks
        assert two["changed"] == one["changed"]
    else:  # a dense update can land one entry exactly on its pretrained value in one summation
        # order and not in the other (measured: 1 of 4,969,216 for Full-Tuning)
        for group, n in one["changed"].items():
            assert abs(two["changed"][group] - n) <= max(1, n // 1_000_000), group
    if method in ("weatherpeft", "fish"):  # each rank held and selected its shard only
        held = [json_load(out / f"selection-rank{r}.json") for r in range(2)]
        assert all(h["sharded"] for h in held)
        assert sum(h["selected"] for h in held) == held[0]["k"]
        assert sum(h["entries"] for h in held) == held[0]["total"]
        assert all(h["entries"] < h["total"] for h in held)
        fisher = tmp_path / "two" / "records" / "fisher"
        assert (fisher / "masks" / "first.npz").exists()  # gathered full masks on disk


def test_each_rank_reads_its_contiguous_share_of_the_global_batch() -> None:
    from wpeft.tasks import create_task

    task = create_task("downscaling", world=WORLD)
    batch = next(iter(task.batches("train", 4, seed=0)))
    parts = [next(iter(task.batches("train", 4, seed=0, shard=(r, 2)))) for r in range(2)]
    for name, full in batch.targets.items():
        assert torch.equal(torch.cat([p.targets[name] for p in parts]), full)
    for name, full in batch.inputs.surf_vars.items():
        assert torch.equal(torch.cat([p.inputs.surf_vars[name] for p in parts]), full)
        assert parts[0].inputs.surf_vars[name].shape[0] == 2
    assert parts[1].inputs.metadata.time == batch.inputs.metadata.time[2:]
    with pytest.raises(ConfigError, match="not divisible by world size 3"):
        next(iter(task.batches("train", 4, seed=0, shard=(0, 3))))


def test_strategy_choice_and_refusals() -> None:
    single, pair = DistEnv(), DistEnv(rank=0, world_size=2)
    lora, sfas = create_method("lora"), create_method("sfas")
    assert resolve_strategy("auto", single, lora) == "none"
    assert resolve_strategy("auto", pair, lora) == "ddp"
    assert resolve_strategy("fsdp", pair, lora) == "fsdp"
    assert resolve_strategy("fsdp", pair, sfas) == "fsdp"  # a global top-k over the shards
    with pytest.raises(ConfigError, match="broadcast_masks"):
        resolve_strategy("fsdp", pair, create_method("sfas", broadcast_masks=True))
    with pytest.raises(ConfigError, match="ranks would train apart"):
        resolve_strategy("none", pair, lora)
    with pytest.raises(ConfigError, match="unknown"):
        TrainConfig(strategy="zero3")


@pytest.mark.slow
def test_torchrun_two_node_launch_of_the_cli(tmp_path) -> None:
    """Two torchrun agents, one per "node" (``--nnodes=2 --nproc_per_node=1``), meet through
    c10d rendezvous as on a cluster and run ``-m wpeft train``; rank 0 alone writes and
    reports."""
    import subprocess
    import sys

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip(f"torchrun not found beside {sys.executable}")
    endpoint = f"127.0.0.1:{_free_port()}"
    cmd = [
        str(torchrun), "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}", "--rdzv-id=wpeft-test", "-m", "wpeft",
        "train", "--method", "lora", "--budget", "0.04", "--steps", "2", "--batch-size", "4",
        "--device", "cpu", "--quiet", "--out", str(tmp_path / "run"),
        "--task-option", f"world={json.dumps(WORLD)}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WPEFT_CACHE_DIR": os.environ["WPEFT_CACHE_DIR"]}
    nodes = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-2000:]
    assert sum(out.count("run ") for out, _ in outputs) == 1  # one report, from rank 0
    summary = json_load(tmp_path / "run" / "summary.json")
    assert summary["world_size"] == 2 and summary["strategy"] == "ddp"


@pytest.mark.slow
def test_sharded_optimizer_state_trains_like_one_rank(tmp_path, reference) -> None:
    """DDP + ZeRO-1 (``shard_optimizer``): WeatherPEFT's masked AdamW state is split over the
    ranks, not replicated, and training matches one process."""
    one_dir, _, one_state = reference(config(method="weatherpeft", budget=0.04))
    out = run_ranks(config(method="weatherpeft", budget=0.04, shard_optimizer=True), tmp_path / "two")
    compare_adapters(one_dir, tmp_path / "two", atol=1e-4)
    shards = [int((out / f"state-rank{r}.txt").read_text()) for r in range(2)]
    assert sum(shards) == one_state  # every entry's state lives on exactly one rank
    assert max(shards) < 0.8 * one_state
    with pytest.raises(ConfigError, match="needs the ddp strategy"):
        train(config(shard_optimizer=True), tmp_path / "single", progress=False)


@pytest.mark.slow
def test_fsdp2_checkpoint_resumes_on_any_world_size(tmp_path) -> None:
    """A WeatherPEFT FSDP2 run is killed after its step-2 checkpoint (full trainable tensors,
    optimiser state and selection masks gathered on rank 0, keyed by name), resumed on two
    FSDP2 ranks and killed again after step 4, then finished in one process: the adapter and
    the Fisher-mask records (Jaccard against masks recorded before each kill included) equal
    an uninterrupted run's. The frozen backbone is not in the checkpoint."""
    import numpy as np

    from wpeft.runs.store import RecordStore
    from wpeft.training.loop import _unpack_bools

    cfg = config(method="weatherpeft", budget=0.04, steps=6, record_every=1)
    ref = train(cfg, tmp_path / "ref", progress=False)
    fsdp = TrainConfig.from_dict({**cfg.to_dict(), "strategy": "fsdp"})
    run = tmp_path / "killed"
    with pytest.raises(mp.ProcessRaisedException, match="killed"):
        run_ranks(fsdp, run, die_at=3)  # during step 3, after the step-2 checkpoint
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 2 and state["strategy"] == "fsdp"
    # SFAS trains the whole backbone's entries (masked), TADP its generators: nothing frozen
    # is stored, and the gathered masks hold exactly k entries.
    assert state["full_state"] and all("backbone" in k or "tadp" in k for k in state["full_state"])
    masks = _unpack_bools(state["selection"])["masks"]
    assert sum(int(m.sum()) for m in masks) == ref["trainable"]["backbone"]
    with pytest.raises(mp.ProcessRaisedException, match="killed"):
        # optimiser steps: torch's zero-lr step that creates state to load into, steps 2 and 3
        # (checkpoint at 4), killed in step 4
        run_ranks(fsdp, run, resume=True, die_at=4)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 4
    train(cfg, run, resume=True, progress=False)
    compare_adapters(tmp_path / "ref", run, atol=1e-4)
    a, b = (RecordStore(r, "fisher").open() for r in (tmp_path / "ref", run))
    assert list(a.step.values) == list(b.step.values) == list(range(6))
    for name in ("density", "union_density", "jaccard_previous", "jaccard_first", "mask_image"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


def test_gathered_state_keeps_trainable_tensors_inside_checkpoint_wrappers() -> None:
    """On GPUs the blocks are wrapped for activation checkpointing, whose names torch's state
    dicts drop: the FSDP checkpoint must still hold every trainable tensor."""
    from wpeft.distributed.strategy import TrainingModule
    from wpeft.training.loop import _gather_full_state, prepare_run

    model, _, method, _, _ = prepare_run(config(method="lora", budget=0.04))
    model.configure_activation_checkpointing()
    module = TrainingModule(model, method.added)
    wrapped = [n for n, p in module.named_parameters() if p.requires_grad and "_checkpoint" in n]
    assert wrapped  # the LoRA matrices sit inside wrapped blocks
    state, _ = _gather_full_state(module, method.optimizer(1e-3))
    assert len(state) == sum(p.requires_grad for p in module.parameters())
    assert not any("_checkpoint" in k for k in state)


@pytest.mark.slow
def test_two_rank_run_on_a_real_layout_store_equals_one_rank(tmp_path, reference) -> None:
    """Downscaling read lazily from a store in WeatherBench2's on-disk layout (the small world
    of these tests, written by ``write_layout``): 2 ranks over gloo train as one process does."""
    from wpeft.data.layouts import write_layout
    from wpeft.data.world import WorldConfig, open_world

    world = open_world(WorldConfig(**WORLD), progress=False)
    store = write_layout(world.isel(time=slice(0, 24)).load(), "wb2", tmp_path / "era5.zarr")
    cfg = config(
        budget=0.04,
        task_options={"data": {"path": str(store), "levels": [850, 500, 250]}, "coarse_factor": 4},
    )
    one_dir, one, _ = reference(cfg)
    assert one["data"]["path"] == str(store) and one["data"]["grid"] == [16, 32]
    run_ranks(cfg, tmp_path / "two")
    two = json_load(tmp_path / "two" / "summary.json")
    assert two["world_size"] == 2 and two["data"] == one["data"]
    compare_adapters(one_dir, tmp_path / "two", atol=1e-4)
    for key, value in one["scores"].items():
        assert two["scores"][key] == pytest.approx(value, rel=1e-4), key
