"""TADP: generator shapes and size, injection keeps token counts, E follows the live weights."""

from __future__ import annotations

import pytest
import torch

from test_backbone import random_batch
from test_methods import pretrained_like
from wpeft.errors import ConfigError
from wpeft.methods import create_method
from wpeft.methods.prompt_injection import PromptInjector
from wpeft.methods.tadp import TADPConfig, TADPGenerator, record_prompt_attention


def expected_generator_size(d_e: int, v: int, s: int, p: int, hidden_s=8, hidden_d=16) -> int:
    """By hand: LN(n) = 2n; Linear(a, b) = a·b + b."""
    hidden_v = v // 2
    space = 2 * s + (s * hidden_s + hidden_s) + (hidden_s * s + s)
    var = 2 * v + (v * hidden_v + hidden_v) + (hidden_v * v + v)
    feat = 2 * d_e + (d_e * hidden_d + hidden_d) + (hidden_d * d_e + d_e)
    external = 2 * d_e
    projection = 2 * v * s + (v * s * p + p)
    return space + var + feat + external + projection


def test_prompts_have_block_widths_and_hand_counted_size() -> None:
    model = pretrained_like()
    method = create_method("tadp", num_prompts=7)
    method.apply(model)
    E = model.embedding_kernels()
    d_e, v = E.shape[:2]
    s = E[0, 0].numel()
    for info, gen in zip(model.blocks, method.added["tadp"]):
        prompts, attn = gen(E, return_attention=True)
        assert prompts.shape == (7, info.dim)
        assert attn.shape == (v * s, v * s)
        torch.testing.assert_close(attn.sum(-1), torch.ones(v * s))
        assert sum(p.numel() for p in gen.parameters()) == expected_generator_size(d_e, v, s, 7)
    assert method.trainable()["added"] == 12 * expected_generator_size(d_e, v, s, 7)
    # paper scale: ~24-30k parameters per block at D_e = 512 with Aurora's 12 variables
    assert 24_000 < expected_generator_size(512, 12, 32, 30) < 33_000


def test_stretch_is_linear_interpolation() -> None:
    gen = TADPGenerator(embed_dim=4, num_vars=2, space=3, num_prompts=2, block_dim=7)
    base = TADPGenerator(embed_dim=4, num_vars=2, space=3, num_prompts=2, block_dim=4)
    base.load_state_dict(gen.state_dict())
    E = torch.randn(4, 2, 1, 1, 3)
    narrow, wide = base(E), gen(E)
    assert torch.allclose(wide[:, 0], narrow[:, 0]) and torch.allclose(wide[:, -1], narrow[:, -1])
    # output j samples input j * 3 / 6: j = 2 hits input 1, j = 3 is the midpoint of 1 and 2
    assert torch.allclose(wide[:, 2], narrow[:, 1])
    assert torch.allclose(wide[:, 3], (narrow[:, 1] + narrow[:, 2]) / 2)


@pytest.mark.parametrize("shifted", [False, True])
def test_injection_keeps_token_count_and_pads_mask(shifted: bool) -> None:
    model = pretrained_like()
    info = [b for b in model.blocks if b.shifted == shifted][0]
    seen = {}

    def spy(module, args, kwargs):
        seen["x"], seen["mask"] = args[0].shape, kwargs.get("mask")

    injector = PromptInjector([info], lambda b: torch.ones(5, b.dim)).install()
    info.attention.register_forward_pre_hook(spy, with_kwargs=True)
    n_w, windows = 64, 6
    x = torch.randn(windows, n_w, info.dim)
    mask = torch.zeros(3, n_w, n_w) - 100.0 * torch.rand(3, n_w, n_w) if shifted else None
    out = info.attention(x, mask=mask)
    assert out.shape == x.shape
    assert seen["x"] == (windows, 5 + n_w, info.dim)
    if shifted:
        padded = seen["mask"]
        assert padded.shape == (3, 5 + n_w, 5 + n_w)
        assert torch.equal(padded[:, 5:, 5:], mask)
        assert torch.equal(padded[:, :5, :], torch.zeros(3, 5, 5 + n_w))
        assert torch.equal(padded[:, :, :5], torch.zeros(3, 5 + n_w, 5))
    injector.remove()
    assert info.attention(x, mask=mask).shape == x.shape


def test_prompts_follow_the_live_embedding_weights() -> None:
    model = pretrained_like()
    method = create_method("tadp", num_prompts=4)
    method.apply(model)
    gen = method.added["tadp"][0]
    before = gen(model.embedding_kernels()).detach().clone()
    with torch.no_grad():
        model.encoder.surf_token_embeds.weights["2t"].mul_(1.5)
    assert not torch.allclose(gen(model.embedding_kernels()), before)


def test_recording_path_returns_attention_maps() -> None:
    model = pretrained_like()
    method = create_method("tadp", num_prompts=3)
    method.apply(model)
    batch = random_batch(model.config, B=1)
    with pytest.raises(RuntimeError, match="eval"):
        with record_prompt_attention(model, method.added["tadp"]):
            pass
    model.eval()
    with torch.no_grad():
        plain = model(batch).surf_vars["2t"]
        with record_prompt_attention(model, method.added["tadp"], blocks=[0, 1], max_windows=4) as rec:
            recorded = model(batch).surf_vars["2t"]
    assert torch.equal(plain, recorded)  # recording does not change the forward pass
    assert sorted(rec) == [0, 1]
    p2p = rec[1]["patch_to_prompt"]  # shifted block
    assert p2p.shape[0] == 4 and p2p.shape[1] == model.blocks[1].num_heads and p2p.shape[-1] == 3
    assert (p2p >= 0).all() and (p2p.sum(-1) <= 1 + 1e-5).all()
    assert rec[0]["external"].shape == (12 * 32, 12 * 32)


def test_bad_config() -> None:
    with pytest.raises(ConfigError, match="num_prompts must be >= 1, got 0"):
        TADPConfig(num_prompts=0)
    with pytest.raises(ConfigError, match="external"):
        TADPConfig(external="quadratic")
