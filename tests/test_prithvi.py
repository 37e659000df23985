"""The Prithvi-WxC adapter: kernels E, blocks, parameter groups, the Batch forward, checkpoints,
a task on it, and the bad inputs (grids, variables, adapters of the other backbone).

``prithvi-tiny`` by hand: D = 192, 6 heads, T = 2, P = 4, 19 channels (4 surface + 5 x 3
levels), grid 32 x 64 in mask units of 8 x 16 -> 4 x 4 = 16 units of 2 x 4 = 8 tokens.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

pytest.importorskip("PrithviWxC", reason='prithviwxc is not installed (pip install -e ".[prithvi]")')

from safetensors.torch import save_file
from test_methods import batch_of, pretrained_like, trained_adapter

from wpeft.backbones.aurora_adapter import build_backbone, norm_key
from wpeft.backbones.configs import CONFIGS, PrithviConfig, get_config
from wpeft.backbones.prithvi_adapter import (
    WpeftPrithvi,
    build_prithvi,
)
from wpeft.cli import main
from wpeft.data.batch import random_batch
from wpeft.data.world import WorldConfig
from wpeft.errors import CheckpointError, ConfigError, DataError
from wpeft.methods import create_method
from wpeft.methods.adapter_file import load_adapter
from wpeft.tasks.downscaling import Downscaling

D, T, P, V = 192, 2, 4, 19
UNITS, TOKENS = 16, 8


@pytest.fixture(scope="module")
def tiny() -> WpeftPrithvi:
    return build_prithvi("prithvi-tiny", seed=0)


def sample(cfg: PrithviConfig, B: int = 1, **kw):
    return random_batch(
        cfg.surf_vars, cfg.static_vars, cfg.atmos_vars, batch_size=B,
        grid=kw.get("grid", cfg.grid), levels=kw.get("levels", cfg.levels),
    )


# --- what methods use -------------------------------------------------------------------------


def test_kernels_are_the_patch_embedding_reshaped(tiny: WpeftPrithvi) -> None:
    cfg = tiny.config
    assert cfg.variables[:5] == ("2t", "10u", "10v", "msl", "z_850") and len(cfg.variables) == V
    E = tiny.embedding_kernels()
    assert E.shape == (D, V, T, P, P)
    W = tiny.prithvi.patch_embedding.proj.weight  # (D, T*V, P, P), input flattened time-major
    assert W.shape == (D, T * V, P, P)
    for v in (0, 4, 18):
        for t in range(T):
            assert torch.equal(E[:, v, t], W[:, t * V + v])
    pairs = tiny.embedding_variables()
    assert pairs[0] == ("surface", "2t") and pairs[4] == ("atmos", "z_850") and len(pairs) == V
    assert torch.equal(tiny.embedding_kernels(pairs), E)
    assert torch.equal(tiny.embedding_kernels(["t_500", "2t"]), E[:, [cfg.variables.index("t_500"), 0]])
    with pytest.raises(ConfigError, match=r"no embedding kernel for \['tp_12h'\]"):
        tiny.embedding_kernels(["tp_12h"])


def test_kernels_follow_live_weights_and_carry_gradients() -> None:
    model = build_prithvi("prithvi-tiny")
    with torch.no_grad():
        model.prithvi.patch_embedding.proj.weight[:, V + 3].add_(1.0)  # msl at t = 1
    E = model.embedding_kernels()
    assert E[:, 3, 1].sum().item() == pytest.approx(
        model.prithvi.patch_embedding.proj.weight[:, V + 3].sum().item()
    )
    E.sum().backward()
    assert model.prithvi.patch_embedding.proj.weight.grad is not None


def test_blocks_run_in_order_with_local_and_global_attention(tiny: WpeftPrithvi) -> None:
    blocks = tiny.blocks
    # 2 n + 1 transformers per stage: encoder n = 2, decoder n = 1
    assert [(b.stage, b.depth) for b in blocks] == [("encoder", j) for j in range(5)] + [
        ("decoder", j) for j in range(3)
    ]
    assert [b.index for b in blocks] == list(range(8))
    assert [b.local for b in blocks] == [True, False, True, False, True, True, False, True]
    assert all(b.dim == D and b.num_heads == 6 for b in blocks)
    seen: list[tuple[int, tuple[int, ...]]] = []
    handles = [
        b.attention.register_forward_hook(
            lambda m, args, out, i=b.index: seen.append((i, tuple(args[0][0].shape)))
        )
        for b in blocks
    ]
    try:
        with torch.no_grad():
            tiny(sample(tiny.config, B=2))
    finally:
        for h in handles:
            h.remove()
    assert [i for i, _ in seen] == list(range(8))
    for (i, shape), b in zip(seen, blocks):
        assert shape == ((2, UNITS, TOKENS, D) if b.local else (2, TOKENS, UNITS, D)), i


def test_parameter_groups_by_module(tiny: WpeftPrithvi) -> None:
    groups = tiny.parameter_groups()
    ids = {g: {id(p) for p in ps} for g, ps in groups.items()}
    assert not (ids["encoder"] & ids["backbone"]) and not (ids["backbone"] & ids["decoder"])
    every = {id(p) for p in tiny.prithvi.parameters()}
    assert ids["encoder"] | ids["backbone"] | ids["decoder"] == every
    net = tiny.prithvi
    assert id(net.patch_embedding.proj.weight) in ids["encoder"]
    assert id(net.mask_token) in ids["encoder"]
    assert id(net.unembed.weight) in ids["decoder"]
    # by hand: a transformer holds 2 LayerNorms (4D), qkv 3D^2, w D^2, MLP 8D^2 + 5D
    counts = tiny.num_parameters()
    assert counts["backbone"] == 8 * (12 * D * D + 9 * D)
    assert counts["decoder"] == D * V * P * P + V * P * P
    assert counts["total"] == sum(p.numel() for p in net.parameters())
    names = dict(tiny.named_parameter_groups())
    assert set(tiny.state_dict()) == {n for ps in names.values() for n, _ in ps}


def test_released_architecture_counts() -> None:
    with torch.device("meta"):
        model = build_prithvi("prithvi-2.3b")
    d = 2560
    counts = model.num_parameters()
    assert counts["backbone"] == (25 + 5) * (12 * d * d + 9 * d)  # n = 12 and 2 pairs
    assert 2.3e9 < counts["total"] < 2.4e9
    assert model.embedding_kernels().shape == (d, 160, 2, 2, 2)
    assert len(model.blocks) == 30


# --- the forward -------------------------------------------------------------------------------


def test_forward_maps_variables_and_predicts_increments_in_std_units() -> None:
    """With ``unembed`` set to a constant k_c per channel, Prithvi's temporal residual gives
    ``output_c = std_c * k_c + last input_c``: every variable and level comes back in place."""
    model = build_prithvi("prithvi-tiny")
    cfg = model.config
    k = torch.arange(V, dtype=torch.float32) / 10
    with torch.no_grad():
        model.prithvi.unembed.weight.zero_()
        model.prithvi.unembed.bias.copy_(k.repeat_interleave(P * P))
    batch = sample(cfg, B=2)
    out = model(batch)
    assert out.metadata.time[0] - batch.metadata.time[0] == timedelta(hours=cfg.timestep_hours)
    for c, v in enumerate(cfg.surf_vars):
        expected = model.norm_std[norm_key(v)] * k[c] + batch.surf_vars[v][:, -1]
        torch.testing.assert_close(out.surf_vars[v][:, 0], expected)
    for j, v in enumerate(cfg.atmos_vars):
        for i, level in enumerate(cfg.levels):
            c = len(cfg.surf_vars) + j * len(cfg.levels) + i
            expected = model.norm_std[norm_key(v, level)] * k[c] + batch.atmos_vars[v][:, -1, i]
            torch.testing.assert_close(out.atmos_vars[v][:, 0, i], expected)
    assert out.surf_vars["2t"].shape == (2, 1, 32, 64)
    assert out.atmos_vars["q"].shape == (2, 1, 3, 32, 64)


def test_forward_is_deterministic_and_follows_the_statics(tiny: WpeftPrithvi) -> None:
    batch = sample(tiny.config)
    with torch.no_grad():
        a, b = tiny(batch), tiny(batch)
        other = dataclasses.replace(
            batch, static_vars={k: v + 1.0 for k, v in batch.static_vars.items()}
        )
        c = tiny(other)
    assert torch.equal(a.surf_vars["2t"], b.surf_vars["2t"])
    assert not torch.equal(a.surf_vars["2t"], c.surf_vars["2t"])


def test_downscaling_trains_on_prithvi(tmp_path: Path) -> None:
    world = WorldConfig(nlat=32, nlon=64, days=8, spinup_days=1, ensemble_inits=2,
                        ensemble_members=2, ensemble_lead_hours=12)
    task = Downscaling(world=world, cache_dir=str(tmp_path))
    model = pretrained_like(backbone="prithvi-tiny")
    head = task.setup(model)
    method = create_method("lora", rank=2)
    method.apply(model, head)
    batch = next(task.batches("train", 1, seed=0))
    pred = task.predict(model, batch)
    assert set(pred) == set(batch.targets)
    assert all(pred[n].shape == y.shape for n, y in batch.targets.items())
    loss = task.loss(pred, batch)
    loss.backward()
    grads = [p.grad for p in method.trainable_parameters()]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(bool(g.abs().sum() > 0) for g in grads)


def test_tadp_prompts_enter_every_local_and_global_sequence() -> None:
    model = pretrained_like(backbone="prithvi-tiny")
    method = create_method("tadp", num_prompts=5)
    method.apply(model)
    shapes: list[tuple[int, ...]] = []
    handles = [
        b.attention.qkv_layer.register_forward_hook(lambda m, a, o: shapes.append(tuple(a[0].shape)))
        for b in model.blocks
    ]
    try:
        with torch.no_grad():
            out = model(batch_of("prithvi-tiny"))
    finally:
        for h in handles:
            h.remove()
    local, glob = (UNITS, TOKENS + 5, D), (TOKENS, UNITS + 5, D)  # (B * rows, P + N, D)
    assert shapes == [local, glob, local, glob, local, local, glob, local]
    assert out.surf_vars["2t"].shape == (1, 1, 32, 64)


# --- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_round_trip_and_refusals(tmp_path: Path) -> None:
    source = build_prithvi("prithvi-tiny", seed=1)
    path = tmp_path / "prithvi.safetensors"
    save_file({k: v.contiguous() for k, v in source.prithvi.state_dict().items()}, str(path))
    loaded = build_prithvi("prithvi-tiny", checkpoint=path)
    batch = sample(loaded.config)
    with torch.no_grad():
        assert torch.equal(loaded(batch).surf_vars["msl"], source(batch).surf_vars["msl"])
    pt = tmp_path / "prithvi.pt"
    torch.save({"model_state": source.prithvi.state_dict()}, pt)
    build_prithvi("prithvi-tiny", checkpoint=pt)

    fewer = PrithviConfig(name="prithvi-no-q", atmos_vars=("z", "u", "v", "t"))
    with pytest.raises(CheckpointError, match=r"does not match Prithvi config 'prithvi-no-q' "
                       r"\(16 channels x 2 steps\): .*shape mismatch"):
        build_prithvi(fewer, checkpoint=path)
    bad = {k: v.clone() for k, v in source.prithvi.state_dict().items()}
    bad["unembed.bias"][0] = float("nan")
    save_file(bad, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match="non-finite"):
        build_prithvi("prithvi-tiny", checkpoint=tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        build_prithvi("prithvi-tiny", checkpoint=tmp_path / "missing.pt")


# --- bad inputs -------------------------------------------------------------------------------


def test_grid_not_divisible_by_mask_unit_or_patch_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"Grid \(30, 64\) is not divisible by the mask unit "
                       r"\(8, 16\) along lat \(30 % 8 = 6\)"):
        PrithviConfig(name="x", grid=(30, 64))
    with pytest.raises(ConfigError, match=r"Mask unit \(8, 15\) is not divisible by the patch "
                       "size 2 along lon"):
        PrithviConfig(name="x", mask_unit_size=(8, 15), grid=(32, 60))
    model = build_prithvi("prithvi-tiny")
    with pytest.raises(DataError, match=r"32 x 60 grid; backbone 'prithvi-tiny' takes 2 steps "
                       r"on its fixed 32 x 64 grid"):
        model(sample(model.config, grid=(32, 60)))
    with pytest.raises(DataError, match=r"Batch levels \(850, 500\) differ"):
        model(sample(model.config, levels=(850, 500)))


def test_variables_other_than_the_configs_are_refused() -> None:
    cfg = get_config("prithvi-tiny")
    with pytest.raises(ConfigError, match=r"embeds channels .*\(not embedded: \['tp_12h'\]"):
        build_prithvi(cfg, variables=(*cfg.variables, "tp_12h"))
    assert build_prithvi(cfg, variables=cfg.variables).config is cfg


def test_adapters_are_refused_across_backbone_families(tmp_path: Path) -> None:
    aurora = trained_adapter("bitfit", batch_of("tiny"), tmp_path / "aurora", 1)
    with pytest.raises(CheckpointError, match="was trained on backbone 'tiny'.*not on this "
                       "'prithvi-tiny'"):
        load_adapter(aurora, pretrained_like(backbone="prithvi-tiny"))
    prithvi = trained_adapter("bitfit", batch_of("prithvi-tiny"), tmp_path / "p", 1, "prithvi-tiny")
    with pytest.raises(CheckpointError, match="was trained on backbone 'prithvi-tiny'.*not on "
                       "this 'tiny'"):
        load_adapter(prithvi, pretrained_like())


def test_build_backbone_dispatches_and_configs_are_registered() -> None:
    assert {"prithvi-tiny", "prithvi-2.3b"} <= set(CONFIGS)
    assert isinstance(build_backbone("prithvi-tiny"), WpeftPrithvi)
    with pytest.raises(ConfigError, match="is an Aurora config"):
        build_prithvi("tiny")
    cfg = get_config("prithvi-tiny")
    assert PrithviConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.fingerprint() != get_config("tiny").fingerprint()


def test_aurora_path_does_not_import_prithvi() -> None:
    code = (
        "import sys; from wpeft.backbones.aurora_adapter import build_backbone; "
        "import wpeft.methods, wpeft.tasks, wpeft.cli; build_backbone('tiny'); "
        "assert not [m for m in sys.modules if m.startswith('PrithviWxC')], 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "PrithviWxC.model", None)  # import raises ImportError
    with pytest.raises(ConfigError, match=r'install it with pip install -e "\.\[prithvi\]"'):
        build_prithvi("prithvi-tiny")


def test_cli_backbone_info(capsys: pytest.CaptureFixture[str], tiny: WpeftPrithvi) -> None:
    assert main(["backbone", "info", "--name", "prithvi-tiny"]) == 0
    out = capsys.readouterr().out
    assert "(PrithviWxC.model.PrithviWxC, fingerprint" in out
    assert f"parameters: {tiny.num_parameters()['total']:,}" in out
    assert f"kernels E: ({D}, {V}, {T}, {P}, {P})" in out
    # The shipped pretrained weights, with their held-out skill (not a random init).
    assert "weights: prithvi-tiny.safetensors sha256" in out
    assert "mean RMSE ratio model / persistence" in out


def test_to_and_eval_reach_prithvis_own_buffers_and_modules() -> None:
    """Prithvi's scalers are buffers of the unforked model, not of a group: ``.to()`` moves them
    too (a GPU run needs this), and ``eval()`` reaches its dropout."""
    model = build_prithvi("prithvi-tiny").to(torch.float64).eval()
    net = model.prithvi
    assert net.input_scalers_mu.dtype == torch.float64 and net.output_scalers.dtype == torch.float64
    assert not net.parameter_dropout.training
    batch = sample(model.config)
    batch = dataclasses.replace(
        batch,
        surf_vars={k: v.double() for k, v in batch.surf_vars.items()},
        atmos_vars={k: v.double() for k, v in batch.atmos_vars.items()},
        static_vars={k: v.double() for k, v in batch.static_vars.items()},
    )
    with torch.no_grad():
        assert model(batch).surf_vars["2t"].dtype == torch.float64


def _loss(model: WpeftPrithvi, batch) -> torch.Tensor:
    pred = model(batch)
    return sum(v.pow(2).mean() for v in pred.surf_vars.values()) + sum(
        v.pow(2).mean() for v in pred.atmos_vars.values()
    )


def test_activation_checkpointing_recomputes_blocks_to_the_same_gradients() -> None:
    """What the training loop calls on CUDA: per-block checkpointing saves fewer tensors and
    leaves the forward and every gradient bitwise unchanged (float32, CPU)."""
    batch = batch_of("prithvi-tiny")

    def run(checkpointed: bool) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        model = pretrained_like(backbone="prithvi-tiny")
        if checkpointed:
            model.configure_activation_checkpointing()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t
        ):
            loss = _loss(model, batch)
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()], sum(saved)

    loss0, grads0, bytes0 = run(False)
    loss1, grads1, bytes1 = run(True)
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    assert bytes1 < 0.5 * bytes0  # the blocks' insides are recomputed, not kept


def test_autocast_backbone_runs_the_blocks_in_bf16_only() -> None:
    """``autocast_backbone`` (set by the training loop on CUDA): attention and MLP run in
    bfloat16, the patch embedding and ``unembed`` in float32; the forecast stays close."""
    model = pretrained_like(backbone="prithvi-tiny").eval()
    batch = batch_of("prithvi-tiny")
    dtypes: dict[str, torch.dtype] = {}
    block = model.blocks[0].block
    hooks = [
        block.attention[1].register_forward_hook(lambda m, a, o: dtypes.__setitem__("attn", o.dtype)),
        block.ff[1].register_forward_hook(lambda m, a, o: dtypes.__setitem__("mlp", o.dtype)),
        model.prithvi.patch_embedding.register_forward_hook(
            lambda m, a, o: dtypes.__setitem__("embed", o.dtype)),
        model.prithvi.unembed.register_forward_hook(lambda m, a, o: dtypes.__setitem__("unembed", o.dtype)),
    ]
    with torch.no_grad():
        ref = model(batch)
        assert set(dtypes.values()) == {torch.float32}
        model.autocast_backbone = True
        low = model(batch)
    for h in hooks:
        h.remove()
    assert dtypes == {"attn": torch.bfloat16, "mlp": torch.bfloat16, "embed": torch.float32,
                      "unembed": torch.float32}
    for k, v in ref.surf_vars.items():
        assert low.surf_vars[k].dtype == torch.float32
        scale = (v - batch.surf_vars[k][:, -1:]).abs().max()
        assert (low.surf_vars[k] - v).abs().max() <= 0.05 * scale, k
