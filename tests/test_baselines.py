"""The PEFT baselines (LoRA, DoRA, SSF, VPT-deep, AdaptFormer) on the tiny backbone.

Per method: exactly the intended scalars train (counted by hand from the block widths, not from the
method's code), training leaves every pristine parameter bitwise unchanged, the additive methods
are the identity at init, a saved adapter reloads exactly onto a fresh backbone, the size knob
scales the count as expected, and bad configs raise ConfigError naming the bad value.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from peft.tuners.lora import LoraLayer

from test_backbone import random_batch
from wpeft.backbones.aurora_adapter import WpeftAurora, build_backbone
from wpeft.errors import ConfigError
from wpeft.methods import adaptformer, lora, ssf, vpt  # noqa: F401  (registration)
from wpeft.methods.base import METHODS, PEFTMethod

# Widths D_b of the tiny backbone's 12 blocks in execution order (see test_backbone), MLP ratio 4.
DIMS = [64, 64, 128, 128, 256, 256, 256, 256, 128, 128, 64, 64]
STEPS = 3


def lora_count(rank: int, sublayers: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")) -> int:
    """r·(in + out) per Linear(in, out): qkv (d, 3d), proj (d, d), fc1 (d, 4d), fc2 (4d, d)."""
    in_plus_out = {"qkv": 4, "proj": 2, "fc1": 5, "fc2": 5}
    return sum(rank * in_plus_out[s] * d for d in DIMS for s in sublayers)


def out_features(sublayers: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")) -> int:
    widths = {"qkv": 3, "proj": 1, "fc1": 4, "fc2": 1}
    return sum(widths[s] * d for d in DIMS for s in sublayers)


@dataclass
class Case:
    """One method: its expected count per config, and how its init output relates to the base."""

    name: str
    count: Any  # (**config) -> expected trainable scalars
    at_init: str  # "equal" (bitwise), "close" (up to rounding) or "differs"
    knob_values: list[dict[str, Any]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # config of the trained instance


CASES = {
    c.name: c
    for c in [
        Case(
            "lora",
            lambda rank=8, targets=("qkv", "proj", "fc1", "fc2"): lora_count(rank, targets),
            "equal",
            [{"rank": 1}, {"rank": 4}, {"rank": 4, "targets": ("qkv",)}],
        ),
        Case(
            "dora",  # LoRA plus one magnitude per output channel
            lambda rank=8, targets=("qkv", "proj", "fc1", "fc2"): lora_count(rank, targets)
            + out_features(targets),
            "close",
            [{"rank": 1}, {"rank": 4}, {"rank": 2, "targets": ("fc1", "fc2")}],
        ),
        Case(
            "ssf",  # scale and shift per output channel
            lambda sublayers=("qkv", "proj", "fc1", "fc2"): 2 * out_features(sublayers),
            "equal",  # with init="identity"; the paper's init is tested below
            [{"sublayers": ("fc1",)}, {"sublayers": ("qkv", "proj")}],
            {"init": "identity"},
        ),
        Case(
            "vpt",  # P prompts of width D_b per block
            lambda num_prompts=10: num_prompts * sum(DIMS),
            "differs",
            [{"num_prompts": 1}, {"num_prompts": 7}],
        ),
        Case(
            "adaptformer",  # Down (d -> b) and Up (b -> d) with biases per block
            lambda bottleneck=16, scale=0.1: sum(2 * d * bottleneck + bottleneck + d for d in DIMS),
            "equal",
            [{"bottleneck": 1}, {"bottleneck": 5}],
        ),
    ]
}
NAMES = list(CASES)


def pretrained_like(seed: int = 0) -> WpeftAurora:
    """A tiny backbone whose blocks are not identity (random init zeroes the res-post-norms)."""
    model = build_backbone("tiny", seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def predict(model: WpeftAurora, batch) -> torch.Tensor:
    """All predicted fields, flattened and concatenated."""
    pred = model(batch)
    fields = [pred.surf_vars[k] for k in sorted(pred.surf_vars)]
    fields += [pred.atmos_vars[k] for k in sorted(pred.atmos_vars)]
    return torch.cat([f.flatten() for f in fields])


def expected_totals(count: int) -> dict[str, int]:
    return {"backbone": 0, "encoder": 0, "decoder": 0, "head": 0, "added": count, "total": count}


@pytest.fixture(scope="module")
def batch():
    return random_batch(build_backbone("tiny").config, B=1, H=16, W=32)


@pytest.fixture(scope="module")
def base_output(batch) -> torch.Tensor:
    """The pretrained-like model's output with every parameter frozen, as methods leave them
    (on CPU, whether the encoder's Perceiver parameters require grad flips the last bit of some
    outputs, so outputs are compared like for like)."""
    model = pretrained_like().requires_grad_(False)
    with torch.no_grad():
        return predict(model, batch)


@dataclass
class Trained:
    model: WpeftAurora
    method: PEFTMethod
    reference: dict[str, torch.Tensor]  # pristine state, keyed as before the method was applied
    pristine: dict[str, torch.nn.Parameter]  # the model's own parameters before applying
    added_at_init: dict[str, torch.Tensor]
    output_at_init: torch.Tensor
    output: torch.Tensor


_trained: dict[str, Trained] = {}


def trained(name: str, batch) -> Trained:
    """``name`` applied to a pretrained-like backbone and trained a few AdamW steps (cached)."""
    if name not in _trained:
        torch.manual_seed(0)
        model = pretrained_like()
        reference = {k: v.clone() for k, v in model.state_dict().items()}
        pristine = dict(model.named_parameters())
        method = METHODS[name](**CASES[name].options)
        method.apply(model)
        added_at_init = {
            n: p.detach().clone()
            for n, p in method.named_parameters()
            if method.group_of(p) == "added"
        }
        with torch.no_grad():
            output_at_init = predict(model, batch)
        opt = method.optimizer(lr=1e-2, weight_decay=0.1)
        for step in range(STEPS):
            opt.zero_grad(set_to_none=True)
            predict(model, batch).pow(2).mean().backward()
            method.after_backward(step, STEPS)
            opt.step()
        with torch.no_grad():
            output = predict(model, batch)
        _trained[name] = Trained(
            model, method, reference, pristine, added_at_init, output_at_init, output
        )
    return _trained[name]


@pytest.mark.parametrize("name", NAMES)
def test_only_intended_parameters_train(name: str) -> None:
    model = build_backbone("tiny")
    pristine = list(model.parameters())
    method = METHODS[name]()
    method.apply(model)
    assert method.trainable() == expected_totals(CASES[name].count())
    assert not any(p.requires_grad for p in pristine)
    # every trainable tensor is the method's own (in the model via peft or in method.added)
    assert all(method.group_of(p) == "added" for p in method.trainable_parameters())


@pytest.mark.parametrize(
    ("name", "knob"), [(c.name, k) for c in CASES.values() for k in c.knob_values]
)
def test_knob_changes_count_as_expected(name: str, knob: dict[str, Any]) -> None:
    model = build_backbone("tiny")
    method = METHODS[name](**knob)
    method.apply(model)
    assert method.trainable() == expected_totals(CASES[name].count(**knob))
    knob_name = METHODS[name].size_knob
    assert knob_name is None or knob_name in knob or name == "dora"


def test_size_knobs() -> None:
    knobs = {name: METHODS[name].size_knob for name in NAMES}
    assert knobs == {
        "lora": "rank",
        "dora": "rank",
        "ssf": None,
        "vpt": "num_prompts",
        "adaptformer": "bottleneck",
    }


@pytest.mark.parametrize("name", NAMES)
def test_output_at_init(name: str, batch, base_output: torch.Tensor) -> None:
    out = trained(name, batch).output_at_init
    relation = CASES[name].at_init
    if relation == "equal":
        assert torch.equal(out, base_output)
    elif relation == "close":
        torch.testing.assert_close(out, base_output, rtol=1e-5, atol=1e-5)
    else:
        assert not torch.allclose(out, base_output, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_training_moves_only_the_method(name: str, batch) -> None:
    t = trained(name, batch)
    for pname, p in t.pristine.items():
        assert torch.equal(p, t.reference[pname]), f"{name}: pristine {pname} moved"
    # counts work by identity although peft renamed state_dict keys (qkv -> qkv.base_layer)
    count = CASES[name].count()
    assert t.method.changed(t.reference) == expected_totals(count)
    moved = [
        n
        for n, p in t.method.named_parameters()
        if t.method.group_of(p) == "added" and not torch.equal(p, t.added_at_init[n])
    ]
    assert moved, f"{name}: training moved none of the method's parameters"
    assert not torch.equal(t.output, t.output_at_init)


@pytest.mark.parametrize("name", NAMES)
def test_adapter_reload_is_exact(name: str, batch) -> None:
    t = trained(name, batch)
    state = t.method.adapter_state(t.reference)
    params = dict(t.method.named_parameters())
    assert {t.method.group_of(params[k]) for k in state} == {"added"}
    assert sum(v.numel() for v in state.values()) == CASES[name].count()

    torch.manual_seed(123)  # a different init of the fresh method's modules
    model = pretrained_like()
    method = METHODS[name](seed=123) if name == "ssf" else METHODS[name]()
    method.apply(model)
    method.load_adapter_state(state)
    with torch.no_grad():
        assert torch.equal(predict(model, batch), t.output)


def test_peft_layers_hit_exactly_the_block_linears() -> None:
    model = build_backbone("tiny")
    METHODS["lora"](targets=("qkv", "fc2")).apply(model)
    cfg = model.config
    expected = set()
    for half, depths in (("encoder", cfg.encoder_depths), ("decoder", cfg.decoder_depths)):
        for i, depth in enumerate(depths):
            for j in range(depth):
                prefix = f"backbone.{half}_layers.{i}.blocks.{j}"
                expected |= {f"{prefix}.attn.qkv", f"{prefix}.mlp.fc2"}
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == expected
    # the base weights are the same frozen parameters, now under peft's base_layer
    keys = model.state_dict().keys()
    assert "backbone.encoder_layers.0.blocks.0.attn.qkv.base_layer.weight" in keys
    assert "backbone.encoder_layers.0.blocks.0.attn.proj.weight" in keys


def test_applying_leaves_the_library_unmodified(batch, base_output: torch.Tensor) -> None:
    for name in NAMES:
        METHODS[name]().apply(build_backbone("tiny"))
    with torch.no_grad():
        assert torch.equal(predict(pretrained_like().requires_grad_(False), batch), base_output)


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trips_through_json(name: str) -> None:
    cls = METHODS[name]
    config = cls.Config()
    assert cls.Config(**json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(
    ("name", "field_name", "value"),
    [
        ("lora", "rank", 0),
        ("lora", "rank", 2.5),
        ("lora", "alpha", -1.0),
        ("lora", "dropout", 1.0),
        ("lora", "targets", ("qkv", "attn")),
        ("lora", "targets", "qkv"),
        ("dora", "rank", -3),
        ("ssf", "sublayers", ()),
        ("ssf", "sublayers", ("fc1", "fc1")),
        ("ssf", "init", "zeros"),
        ("ssf", "init_std", 0.0),
        ("ssf", "init_std", float("inf")),
        ("vpt", "num_prompts", 0),
        ("vpt", "num_prompts", True),
        ("adaptformer", "bottleneck", 0),
        ("adaptformer", "scale", 0.0),
        ("adaptformer", "scale", float("nan")),
    ],
)
def test_bad_config_raises(name: str, field_name: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{field_name} must")) as info:
        METHODS[name](**{field_name: value})
    assert repr(value) in str(info.value)


# --- SSF's init ---------------------------------------------------------------------------------


def ssf_tensors(**options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """All scales and all shifts of SSF applied to the tiny backbone, concatenated."""
    method = METHODS["ssf"](**options)
    method.apply(build_backbone("tiny"))
    affines = [m for m in method.added.modules() if isinstance(m, ssf.ScaleShift)]
    return (torch.cat([a.scale.detach() for a in affines]),
            torch.cat([a.shift.detach() for a in affines]))


def test_ssf_paper_init_is_normal_around_identity_and_seeded(batch, base_output) -> None:
    scale, shift = ssf_tensors()  # init="paper", init_std=0.02, seed=0
    assert scale.numel() == shift.numel() == out_features() == 9 * sum(DIMS) == 16_128
    # 16,128 draws: the sample mean is within 4.5 standard errors (0.02 / sqrt(n) = 1.6e-4)
    assert abs(float(scale.mean()) - 1.0) < 7e-4 and abs(float(shift.mean())) < 7e-4
    # the sample std within 2 % (3.6 standard errors of a std, 1 / sqrt(2n) = 0.56 %)
    assert float(scale.std()) == pytest.approx(0.02, rel=0.02)
    assert float(shift.std()) == pytest.approx(0.02, rel=0.02)
    again = ssf_tensors(seed=0)
    assert torch.equal(again[0], scale) and torch.equal(again[1], shift)  # reproducible
    other = ssf_tensors(seed=1)
    assert not torch.equal(other[0], scale) and not torch.equal(other[1], shift)
    wider = ssf_tensors(init_std=0.1)[0]
    assert float(wider.std()) == pytest.approx(0.1, rel=0.02)
    # the model no longer starts as the pretrained one
    model = pretrained_like()
    METHODS["ssf"]().apply(model)
    with torch.no_grad():
        out = predict(model, batch)
    assert not torch.allclose(out, base_output, rtol=1e-3, atol=1e-3)


def test_ssf_identity_init_is_exactly_identity(batch, base_output) -> None:
    scale, shift = ssf_tensors(init="identity", seed=5)
    assert torch.equal(scale, torch.ones_like(scale)) and torch.equal(shift, torch.zeros_like(shift))
    model = pretrained_like()
    METHODS["ssf"](init="identity").apply(model)
    with torch.no_grad():
        assert torch.equal(predict(model, batch), base_output)
