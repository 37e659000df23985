"""Variables a task adds (``tp_12h``, ``2t_logscale``...) on Prithvi-WxC: extra kernels and heads
around the unforked model, and post-processing / precipitation training on ``prithvi-tiny``.

``prithvi-tiny`` by hand: D = 192, T = 2, P = 4, V = 19 own channels (4 surface + 5 x 3 levels),
grid 32 x 64. A surface task variable adds 1 channel, an atmospheric one 3 (one per level).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("PrithviWxC", reason='prithviwxc is not installed (pip install -e ".[prithvi]")')

from test_methods import pretrained_like

from wpeft.backbones.aurora_adapter import norm_key
from wpeft.backbones.prithvi_adapter import WpeftPrithvi, build_prithvi
from wpeft.data.batch import random_batch
from wpeft.data.source import DataSource
from wpeft.errors import ConfigError, DataError
from wpeft.methods import create_method
from wpeft.methods.adapter_file import load_adapter, save_adapter
from wpeft.tasks import create_task
from wpeft.tasks.common import TaskHead, add_variable, copy_task_variables, register_norm
from wpeft.training.loop import TrainConfig, load_backbone, run_method_options

D, T, P, V, C = 192, 2, 4, 19, 3
WORLD = {"nlat": 32, "nlon": 64, "days": 8, "spinup_days": 1, "ensemble_inits": 8,
         "ensemble_members": 3, "ensemble_lead_hours": 12}
TASK_OPTIONS = {
    "postprocessing": {"world": WORLD},
    # samples span 48 h: a longer record; Prithvi reads the whole 32 x 64 grid
    "precipitation": {"world": {**WORLD, "days": 24}, "crop_size": (32, 64)},
}


@pytest.fixture(autouse=True)
def small_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WPEFT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "world-cache"))


def with_task_inputs(model: WpeftPrithvi, B: int = 2, seed: int = 0):
    """A random batch on ``model``'s grid with ``tp_12h`` (surface) and ``t_logscale`` (atmos)."""
    cfg = model.config
    batch = random_batch(cfg.surf_vars, cfg.static_vars, cfg.atmos_vars, batch_size=B,
                         grid=cfg.grid, levels=cfg.levels)
    g = torch.Generator().manual_seed(seed)
    H, W = cfg.grid
    return dataclasses.replace(
        batch,
        surf_vars={**batch.surf_vars, "tp_12h": 3.0 + torch.rand(B, T, H, W, generator=g)},
        atmos_vars={**batch.atmos_vars, "t_logscale": torch.randn(B, T, C, H, W, generator=g)},
    )


def add_two(model: WpeftPrithvi, init: str = "zeros") -> TaskHead:
    head = TaskHead()
    add_variable(model, head, "tp_12h", "surface", embed_init=init, head_init=init)  # type: ignore[arg-type]
    add_variable(model, head, "t_logscale", "atmos", embed_init=init, head_init=init)  # type: ignore[arg-type]
    return head


# --- the backbone ------------------------------------------------------------------------------


def test_zero_task_variables_leave_the_forward_unchanged_and_return_their_last_input() -> None:
    model = pretrained_like(backbone="prithvi-tiny").eval()
    batch = with_task_inputs(model)
    with torch.no_grad():
        before = model(batch)
    head = add_two(model)
    assert head.variables == ("tp_12h", "t_logscale")
    with torch.no_grad():
        after = model(batch)
    for k, v in before.surf_vars.items():
        assert torch.equal(after.surf_vars[k], v), k
    for k, v in before.atmos_vars.items():
        assert torch.equal(after.atmos_vars[k], v), k
    # temporal residual with a zero head: the last input step, exactly
    assert after.surf_vars["tp_12h"].shape == (2, 1, 32, 64)
    assert torch.equal(after.surf_vars["tp_12h"][:, 0], batch.surf_vars["tp_12h"][:, -1])
    assert after.atmos_vars["t_logscale"].shape == (2, 1, C, 32, 64)
    assert torch.equal(after.atmos_vars["t_logscale"][:, 0], batch.atmos_vars["t_logscale"][:, -1])
    # hooks installed once, whatever the number of variables; a refused batch leaves no state
    assert len(model.prithvi.patch_embedding._forward_hooks) == 1
    assert len(model.prithvi.decoder._forward_hooks) == 1
    lacking = dataclasses.replace(
        batch, surf_vars={k: v for k, v in batch.surf_vars.items() if k != "tp_12h"}
    )
    with pytest.raises(DataError, match=r"lacks variable\(s\) \['tp_12h'\] that a task added"):
        model(lacking)
    with torch.no_grad():
        again = model(batch)
    assert torch.equal(again.surf_vars["2t"], before.surf_vars["2t"])


def test_task_kernel_adds_its_convolution_and_head_unpatches_like_prithvi() -> None:
    """Tokens after ``patch_embedding`` grow by sum_{c,t} conv2d((x_{c,t} - m_c) / s_c, E_{c,t})
    (stride P); a head with bias b only outputs last input + s * b[(h % P) P + w % P]."""
    model = pretrained_like(backbone="prithvi-tiny").to(torch.float64).eval()
    batch = with_task_inputs(model, B=1)
    batch = dataclasses.replace(  # float64: the difference of two token sets is exact enough
        batch,
        surf_vars={k: v.double() for k, v in batch.surf_vars.items()},
        atmos_vars={k: v.double() for k, v in batch.atmos_vars.items()},
        static_vars={k: v.double() for k, v in batch.static_vars.items()},
    )
    kernel, surf_head = model.add_task_variable("tp_12h", "surface", embed_init="zeros",
                                                head_init="zeros")
    atmos_kernel, _ = model.add_task_variable("t_logscale", "atmos", embed_init="zeros",
                                              head_init="zeros")
    register_norm(model, "tp_12h", 3.5, 0.25)
    for i, lv in enumerate(model.config.levels):
        register_norm(model, norm_key("t_logscale", lv), 0.1 * i, 2.0 + i)
    tokens: list[torch.Tensor] = []
    hook = model.prithvi.patch_embedding.register_forward_hook(lambda m, a, o: tokens.append(o))
    try:
        with torch.no_grad():
            model(batch)  # zero kernels
            g = torch.Generator().manual_seed(1)
            kernel.copy_(torch.randn(kernel.shape, generator=g))
            atmos_kernel.copy_(torch.randn(atmos_kernel.shape, generator=g))
            bias = torch.arange(P * P, dtype=torch.float64)
            surf_head.bias.copy_(bias)
            out = model(batch)
    finally:
        hook.remove()
    assert kernel.shape == (D, 1, T, P, P) and atmos_kernel.shape == (D, C, T, P, P)
    expected = torch.zeros_like(tokens[0])
    x = batch.surf_vars["tp_12h"]
    for t in range(T):
        expected += F.conv2d((x[:, t : t + 1] - 3.5) / 0.25, kernel[:, :, t], stride=P)
        for c in range(C):
            xa = (batch.atmos_vars["t_logscale"][:, t, c : c + 1] - 0.1 * c) / (2.0 + c)
            expected += F.conv2d(xa, atmos_kernel[:, c : c + 1, t], stride=P)
    torch.testing.assert_close(tokens[1] - tokens[0], expected, rtol=1e-9, atol=1e-9)
    h, w = torch.meshgrid(torch.arange(32), torch.arange(64), indexing="ij")
    by_hand = x[0, -1] + 0.25 * bias[(h % P) * P + w % P]
    torch.testing.assert_close(out.surf_vars["tp_12h"][0, 0], by_hand)


def test_kernels_and_variables_grow_by_the_task_channels() -> None:
    model = build_prithvi("prithvi-tiny")
    add_two(model, init="aurora")
    pairs = model.embedding_variables()
    assert len(pairs) == V + 1 + C
    assert pairs[V:] == (("surface", "tp_12h"), ("atmos", "t_logscale_850"),
                         ("atmos", "t_logscale_500"), ("atmos", "t_logscale_250"))
    assert model.task_variables() == (("surface", "tp_12h"), ("atmos", "t_logscale"))
    E = model.embedding_kernels(pairs)
    assert E.shape == (D, V + 1 + C, T, P, P)
    assert model.embedding_kernels().shape == (D, V, T, P, P)  # the backbone's own
    assert torch.equal(E[:, :V], model.embedding_kernels())
    tp = model.encoder.task_surf_embeds["tp_12h"]
    atm = model.encoder.task_atmos_embeds["t_logscale"]
    assert torch.equal(E[:, V], tp[:, 0]) and torch.equal(E[:, V + 1 :], atm)
    assert torch.equal(model.embedding_kernels(["t_logscale_500", "2t"])[:, 0], atm[:, 1])
    # the new parameters live in the encoder / decoder groups and the state dict
    enc = {id(p) for p in model.parameter_groups()["encoder"]}
    dec = {id(p) for p in model.parameter_groups()["decoder"]}
    assert id(tp) in enc and id(atm) in enc
    assert id(model.decoder.task_atmos_heads["t_logscale"].weight) in dec
    assert model.decoder.task_atmos_heads["t_logscale"].out_features == C * P * P
    assert "encoder.task_surf_embeds.tp_12h" in model.state_dict()
    assert "encoder.task_surf_embeds.tp_12h" not in model.weights_state()
    # budget probes: the same variables on a fresh backbone, zero-initialised
    fresh = build_prithvi("prithvi-tiny")
    head = copy_task_variables(model, fresh)
    assert fresh.embedding_variables() == pairs and head.variables == ("tp_12h", "t_logscale")
    assert not fresh.encoder.task_atmos_embeds["t_logscale"].any()


def test_task_variable_refusals() -> None:
    model = build_prithvi("prithvi-tiny")
    add_two(model)
    with pytest.raises(ConfigError, match="already has a variable 'tp_12h'"):
        model.add_task_variable("tp_12h", "surface")
    with pytest.raises(ConfigError, match="already has a variable '2t'"):
        model.add_task_variable("2t", "surface")
    with pytest.raises(ConfigError, match="kind='static' must be"):
        model.add_task_variable("x", "static")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'z_500' is a channel of backbone 'prithvi-tiny'"):
        register_norm(model, "z_500", 0.0, 1.0)
    with pytest.raises(ConfigError, match="no embedding kernel for \\['tp_24h'\\]"):
        model.embedding_kernels(["tp_24h"])


# --- the tasks on prithvi-tiny -----------------------------------------------------------------


def _step(task, model, method, batch, step: int, steps: int, opt) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    method.before_backward(step, steps)
    loss = task.loss(task.predict(model, batch), batch)
    loss.backward()
    method.after_backward(step, steps)
    opt.step()
    return loss.detach()


def _setup(cfg: TrainConfig):
    """Pristine backbone, task and head as ``wpeft train`` sets them up (prepare_run), and the
    pristine reference (backbone and ``head.<name>``)."""
    torch.manual_seed(cfg.seed)
    model = load_backbone(cfg)
    task = create_task(cfg.task, seed=cfg.seed, **cfg.task_options)
    head = task.setup(model)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    reference |= {f"head.{n}": p.detach().clone() for n, p in head.named_parameters()}
    return model, task, head, reference


@pytest.mark.parametrize("method_name", ["weatherpeft", "lora"])
@pytest.mark.parametrize("task_name", ["postprocessing", "precipitation"])
def test_tasks_train_on_prithvi_and_their_adapters_reload(
    task_name: str, method_name: str, tmp_path: Path
) -> None:
    options = {"num_prompts": 2} if method_name == "weatherpeft" else {"rank": 2}
    cfg = TrainConfig(task=task_name, method=method_name, backbone="prithvi-tiny", steps=2,
                      batch_size=2, warmup_steps=1, task_options=TASK_OPTIONS[task_name],
                      method_options=options, device="cpu")
    model, task, head, reference = _setup(cfg)
    n_task = {"postprocessing": 4 + 5 * C, "precipitation": 3}[task_name]
    assert len(model.embedding_variables()) == V + n_task
    pristine = {n: p for ps in model.named_parameter_groups().values() for n, p in ps}
    method = create_method(method_name, **run_method_options(cfg, task))
    method.apply(model, head)
    frozen = {n: p for n, p in pristine.items() if not p.requires_grad}
    assert frozen and all(p.requires_grad for p in head.parameters())
    opt = method.optimizer(lr=1e-2, weight_decay=0.0)
    batches = task.batches("train", 2, seed=0)
    losses = [_step(task, model, method, next(batches), s, 2, opt) for s in range(2)]
    assert all(torch.isfinite(x) for x in losses)
    for n, p in frozen.items():
        assert torch.equal(p, reference[n]), f"frozen {n} moved"
    changed, trainable = method.changed(reference), method.trainable()
    for group in ("encoder", "decoder"):  # the pretrained encoder / decoder stay in budget
        assert changed[group] <= trainable[group], group
    assert changed["head"] > 0  # the task's kernels / heads trained

    path = save_adapter(method, reference, tmp_path / "adapter", task=task_name)
    fresh, fresh_task, fresh_head, _ = _setup(cfg)
    load_adapter(path, fresh, fresh_head)
    model.eval()
    fresh.eval()
    batch = next(task.batches("test", 2))
    with torch.no_grad():
        expected, got = task.predict(model, batch), fresh_task.predict(fresh, batch)
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_real_stores_and_other_grids_are_refused_on_prithvi(tmp_path: Path) -> None:
    model = build_prithvi("prithvi-tiny")
    store = DataSource(path=str(tmp_path / "ens.zarr"))
    post = create_task("postprocessing", data=store, truth_path=str(tmp_path / "era5.zarr"),
                       lead_hours=24)
    with pytest.raises(ConfigError, match=r"Post-processing on a real store \(data=...\) needs a "
                       r"backbone that reads any grid and levels; backbone 'prithvi-tiny' embeds "
                       r"a fixed 32 x 64 grid"):
        post.setup(model)
    precip = create_task("precipitation", data=store)
    with pytest.raises(ConfigError, match="Precipitation on a real store"):
        precip.setup(model)
    cropped = create_task("precipitation", world={**WORLD, "days": 24})  # default 16 x 32 crop
    with pytest.raises(DataError, match=r"Grid 16 x 32 differs from the 32 x 64 grid backbone "
                       r"'prithvi-tiny' reads; .*crop_size=\(32, 64\)"):
        cropped.setup(model)
    assert model.task_variables() == ()  # refused before the backbone changed
