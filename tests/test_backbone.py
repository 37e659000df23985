"""The Aurora adapter: kernels E, block list, parameter groups, normalisation, checkpoints."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from aurora import Aurora, AuroraSmallPretrained, Batch
from aurora.model.swin3d import WindowAttention
from safetensors.torch import save_file

from wpeft.backbones.aurora_adapter import WpeftAurora, build_backbone, file_sha256, load_weights
from wpeft.backbones.configs import CONFIGS, BackboneConfig, get_config
from wpeft.data.batch import random_batch as make_random_batch
from wpeft.errors import CheckpointError, ConfigError

LEVELS = (850, 500, 250)


def random_batch(cfg: BackboneConfig, B: int = 2, T: int = 2, H: int = 32, W: int = 64) -> Batch:
    return make_random_batch(
        cfg.surf_vars, cfg.static_vars, cfg.atmos_vars, batch_size=B, history=T, grid=(H, W), levels=LEVELS
    )


@pytest.fixture(scope="module")
def tiny() -> WpeftAurora:
    return build_backbone("tiny", seed=0)


def test_kernels_shape_and_order(tiny: WpeftAurora) -> None:
    cfg = tiny.config
    E = tiny.embedding_kernels()
    assert E.shape == (cfg.embed_dim, 12, cfg.max_history_size, cfg.patch_size, cfg.patch_size)
    surf = tiny.encoder.surf_token_embeds.weights
    atmos = tiny.encoder.atmos_token_embeds.weights
    # surface, static, then atmospheric; static z and atmospheric z are different kernels
    for i, name in enumerate(cfg.surf_vars + cfg.static_vars):
        assert torch.equal(E[:, i], surf[name][:, 0])
    n = len(cfg.surf_vars) + len(cfg.static_vars)
    for j, name in enumerate(cfg.atmos_vars):
        assert torch.equal(E[:, n + j], atmos[name][:, 0])
    assert not torch.equal(E[:, cfg.variables.index("z")], E[:, n])


def test_kernels_follow_live_weights() -> None:
    model = build_backbone("tiny", seed=0)
    before = model.embedding_kernels().clone()
    with torch.no_grad():
        model.encoder.atmos_token_embeds.weights["t"].add_(1.0)
    after = model.embedding_kernels()
    changed = (after != before).any(dim=(0, 2, 3, 4))
    assert changed.tolist() == [v == "t" and i >= 7 for i, v in enumerate(model.config.variables)]
    # differentiable: gradients reach the embedding parameters
    after.sum().backward()
    assert model.encoder.surf_token_embeds.weights["2t"].grad is not None


def test_blocks_in_execution_order(tiny: WpeftAurora) -> None:
    blocks = tiny.blocks
    assert [b.dim for b in blocks] == [64, 64, 128, 128, 256, 256, 256, 256, 128, 128, 64, 64]
    assert [b.shifted for b in blocks] == [False, True] * 6
    assert [b.index for b in blocks] == list(range(12))
    assert blocks[0].name == "encoder0.0" and blocks[-1].name == "decoder2.1"
    assert all(isinstance(b.attention, WindowAttention) and b.attention is b.block.attn for b in blocks)
    assert [b.num_heads for b in blocks[:6]] == [2, 2, 4, 4, 8, 8]


def test_parameter_groups_partition_the_model(tiny: WpeftAurora) -> None:
    groups = tiny.parameter_groups()
    ids = {g: {id(p) for p in ps} for g, ps in groups.items()}
    assert not (ids["encoder"] & ids["backbone"]) and not (ids["backbone"] & ids["decoder"])
    assert ids["encoder"] | ids["backbone"] | ids["decoder"] == {id(p) for p in tiny.parameters()}
    # by module: the patch embeddings are encoder, the Swin blocks are backbone
    assert id(tiny.encoder.surf_token_embeds.weights["2t"]) in ids["encoder"]
    assert id(tiny.blocks[3].attention.qkv.weight) in ids["backbone"]
    counts = tiny.num_parameters()
    assert counts["total"] == sum(p.numel() for p in tiny.parameters())
    assert 2_000_000 < counts["total"] < 10_000_000  # "a few million"


def test_named_configs() -> None:
    assert set(CONFIGS) == {"tiny", "small", "1.3b", "prithvi-tiny", "prithvi-2.3b"}
    with pytest.raises(ConfigError, match="Unknown backbone 'huge'"):
        get_config("huge")
    # "1.3b" and "small" are exactly the library's Aurora and AuroraSmall architectures.
    for name, cls in (("1.3b", Aurora), ("small", AuroraSmallPretrained)):
        defaults = {
            k: p.default
            for c in (cls, Aurora)
            for k, p in reversed(inspect.signature(c.__init__).parameters.items())
        }
        defaults.update(
            {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
        )
        kwargs = get_config(name).aurora_kwargs()
        for key in ("embed_dim", "encoder_depths", "decoder_depths", "encoder_num_heads",
                    "decoder_num_heads", "num_heads", "patch_size", "window_size"):
            assert kwargs[key] == defaults[key], (name, key)
    small = build_backbone("small")
    assert 100e6 < small.num_parameters()["total"] < 125e6
    cfg = get_config("tiny")
    assert BackboneConfig.from_dict(cfg.to_dict()) == cfg


def test_normalisation_uses_own_statistics() -> None:
    cfg = get_config("tiny")
    mean = {"2t": 280.0, "z_500": 5.5e4}
    std = {"2t": 10.0, "z_500": 800.0}
    model = build_backbone(cfg, norm_mean=mean, norm_std=std)
    batch = random_batch(cfg)
    mapped = model._pre_norm_hook(batch)
    normed = mapped.normalise(surf_stats=model.surf_stats)
    x = batch.surf_vars["2t"]
    torch.testing.assert_close(normed.surf_vars["2t"], (x - 280.0) / 10.0)
    z = batch.atmos_vars["z"][:, :, 1]
    torch.testing.assert_close(normed.atmos_vars["z"][:, :, 1], (z - 5.5e4) / 800.0)
    # the post hook undoes it exactly (round trip through Aurora's unnormalise)
    back = model._post_unnorm_hook(batch, normed.unnormalise(surf_stats=model.surf_stats))
    torch.testing.assert_close(back.surf_vars["2t"], x, rtol=1e-5, atol=1e-3)


def test_safetensors_round_trip_reproduces_outputs(tmp_path, tiny: WpeftAurora) -> None:
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))
    other = build_backbone("tiny", seed=123, checkpoint=path)
    batch = random_batch(tiny.config)
    tiny.eval(), other.eval()
    with torch.no_grad():
        a, b = tiny(batch), other(batch)
    assert torch.equal(a.surf_vars["2t"], b.surf_vars["2t"])


def test_aurora_ckpt_loads_with_weights_only(tmp_path, tiny: WpeftAurora) -> None:
    path = tmp_path / "model.ckpt"
    torch.save(tiny.state_dict(), path)
    other = build_backbone("tiny", seed=7, checkpoint=path)
    assert torch.equal(other.blocks[0].attention.qkv.weight, tiny.blocks[0].attention.qkv.weight)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_bad_checkpoints_give_clear_errors(tmp_path, tiny: WpeftAurora) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        build_backbone("tiny", checkpoint=tmp_path / "nope.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_weights(tiny, corrupt)
    evil = tmp_path / "evil.ckpt"
    torch.save({"x": _Evil()}, evil)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_weights(tiny, evil)
    # a checkpoint of another architecture
    other_cfg = BackboneConfig(**{**get_config("tiny").to_dict(), "name": "narrow", "embed_dim": 32})
    other = build_backbone(other_cfg)
    wrong = tmp_path / "narrow.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(wrong))
    with pytest.raises(CheckpointError, match="does not match backbone config 'tiny'.*shape mismatch"):
        load_weights(tiny, wrong)


def test_non_finite_checkpoints_are_refused(tmp_path, tiny: WpeftAurora) -> None:
    from wpeft.backbones.pretrain import load_pretrained, pretrained_card

    state = {k: v.clone().contiguous() for k, v in tiny.state_dict().items()}
    name = "backbone.encoder_layers.0.blocks.0.attn.qkv.weight"
    state[name][0, 0] = float("nan")
    path = tmp_path / "tiny.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=rf"non-finite values \(NaN/inf\) in 1 tensor.*{name}"):
        build_backbone("tiny", checkpoint=path)
    # Aurora's .ckpt path too; every bad tensor is counted, the first ones named, on one line
    first = min(k for k, v in state.items() if v.is_floating_point())
    state[first].view(-1)[0] = float("inf")
    ckpt = tmp_path / "model.ckpt"
    torch.save(state, ckpt)
    with pytest.raises(CheckpointError, match=rf"in 2 tensor\(s\), e.g. {first}, {name}:") as info:
        build_backbone("tiny", checkpoint=ckpt)
    assert "\n" not in str(info.value)
    # the card's sha256 matches the poisoned file: the weights are refused all the same
    card = pretrained_card("tiny")
    (tmp_path / card["weights"]).write_bytes(path.read_bytes())
    (tmp_path / "tiny.json").write_text(
        json.dumps({**card, "sha256": file_sha256(tmp_path / card["weights"])})
    )
    with pytest.raises(CheckpointError, match=f"non-finite.*{name}"):
        load_pretrained("tiny", tmp_path)
    # the model a refused checkpoint was loaded into keeps its weights
    before = tiny.state_dict()[name].clone()
    with pytest.raises(CheckpointError, match="non-finite"):
        load_weights(tiny, path)
    assert torch.equal(tiny.state_dict()[name], before)


def test_residual_backbones_predict_increments() -> None:
    cfg = get_config("tiny")
    assert cfg.residual and not get_config("small").residual and not get_config("1.3b").residual
    model = build_backbone(cfg)
    batch = random_batch(cfg)
    zero = Batch(
        surf_vars={k: torch.zeros_like(v[:, -1:]) for k, v in batch.surf_vars.items()},
        static_vars={},
        atmos_vars={k: torch.zeros_like(v[:, -1:]) for k, v in batch.atmos_vars.items()},
        metadata=batch.metadata,
    )
    out = model._post_decoder_hook(batch, zero)  # zero increment: the last input step
    assert torch.equal(out.surf_vars["2t"], batch.surf_vars["2t"][:, -1:])
    assert torch.equal(out.atmos_vars["q"], batch.atmos_vars["q"][:, -1:])
    full = build_backbone(BackboneConfig(**{**cfg.to_dict(), "residual": False}))
    assert full._post_decoder_hook(batch, zero) is zero
