"""TADP: generator shapes and size, injection keeps token counts, E follows the live weights;
E covers the task's new variables, the task's prompt count, the ``tadp`` ablation is
WeatherPEFT's TADP, and adapters are refused on a task with other variables."""

from __future__ import annotations

import json

import pytest
import torch

from test_backbone import random_batch
from test_methods import pretrained_like
from wpeft.backbones.pretrain import load_pretrained
from wpeft.errors import CheckpointError, ConfigError
from wpeft.methods import create_method
from wpeft.methods.adapter_file import load_adapter, save_adapter
from wpeft.methods.prompt_injection import PromptInjector
from wpeft.methods.tadp import (
    DEFAULT_PROMPTS,
    TADPConfig,
    TADPGenerator,
    TADPGenerators,
    record_prompt_attention,
)
from wpeft.runs.attention_records import record_attention, variable_labels
from wpeft.tasks import create_task
from wpeft.training.compare import CompareConfig
from wpeft.training.loop import TrainConfig, prepare_run

#: A small embedded world (as in test_tasks) and the task settings that fit it.
WORLD = {"nlat": 16, "nlon": 32, "days": 20, "spinup_days": 1, "ensemble_inits": 12,
         "ensemble_members": 4, "ensemble_lead_hours": 24}
TASK_OPTIONS = {
    "downscaling": {"world": WORLD},
    "postprocessing": {"world": WORLD},
    "precipitation": {"world": WORLD, "crop_size": (12, 16)},
}
TP = ("tp_12h", "tp_24h", "tp_36h")


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
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match=rf"num_prompts must be an integer >= 1 \(or None\), got {bad!r}"):
            TADPConfig(num_prompts=bad)
    assert TADPConfig().num_prompts is None  # the task's
    with pytest.raises(ConfigError, match="external"):
        TADPConfig(external="quadratic")


# --- E over the task's variables ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("tadp-world"))


def task_options(task: str, cache: str) -> dict:
    return {**TASK_OPTIONS[task], "cache_dir": cache}


def set_up(task: str, cache: str, method: str = "tadp", **options):
    """The pretrained tiny backbone with ``task``'s head and ``method`` applied (P given or the
    task's, as a run resolves it), plus the task, head and the pristine reference state."""
    model = load_pretrained("tiny")
    t = create_task(task, **task_options(task, cache))
    torch.manual_seed(0)  # the task's new kernels are drawn at setup (a run seeds here too)
    head = t.setup(model)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    reference |= {f"head.{n}": p.detach().clone() for n, p in head.named_parameters()}
    m = create_method(method, **{**create_method(method).task_settings(t), **options})
    m.apply(model, head)
    return model, t, head, m, reference


def test_e_covers_the_tasks_new_variables_after_setup(cache: str) -> None:
    model, task, head, method, _ = set_up("precipitation", cache)
    own = model.config.variables
    gens = method.prompt_generators
    assert isinstance(gens, TADPGenerators) and gens is method.added["tadp"]
    # stated order: the backbone's (surface, static, atmospheric), then the task's new ones
    assert [n for _, n in gens.variables] == [*own, *TP]
    assert gens.variables == model.embedding_variables()
    assert gens.variables[len(own):] == tuple(("surface", n) for n in TP)
    assert tuple(head.variables) == TP
    E = gens.kernels(model)
    s = E[0, 0].numel()
    assert E.shape[1] == len(own) + 3 == 15
    for i, name in enumerate(TP):  # the task's kernels are E's last rows, the head's own tensors
        assert torch.equal(E[:, len(own) + i], head.surf_embeds[name][:, 0])
    torch.testing.assert_close(E[:, : len(own)], model.embedding_kernels())
    for gen in gens:  # V = 15 in every generator
        assert gen.variable_adapter.norm.normalized_shape == (15,)
        assert gen.to_prompts.in_features == 15 * s and gen.to_prompts.out_features == 20
    d_e = E.shape[0]
    assert method.trainable()["added"] == 12 * expected_generator_size(d_e, 15, s, 20)
    assert method.describe()["prompt_variables"][-3:] == [f"surface:{n}" for n in TP]
    names, aurora, kinds = variable_labels(model, gens.variables)
    assert names[-3:] == [f"{n} (surface)" for n in TP] and aurora[-3:] == list(TP)
    assert kinds[4:7] == ["static"] * 3 and names[5] == "geopotential_at_surface"
    # the attention records have E's 15 variables
    batch = next(task.batches("val", 1, seed=0))
    ds = record_attention(model, gens, batch, lambda b: task.predict(model, b), blocks=[0])
    assert ds.sizes["variable"] == 15 and list(ds["aurora_name"].values[-3:]) == list(TP)
    assert ds["external_var_var"].shape == (1, 15, 15)


def test_e_order_and_size_on_post_processing(cache: str) -> None:
    model, _, _, method, _ = set_up("postprocessing", cache)
    gens = method.prompt_generators
    own = len(model.config.variables)
    surf = [("surface", f"{v}_logscale") for v in model.config.surf_vars]
    atmos = [("atmos", f"{v}_logscale") for v in model.config.atmos_vars]
    assert list(gens.variables[own:]) == surf + atmos  # surface embedding first, as added
    assert gens.kernels(model).shape[1] == own + 9 == 21
    assert method.num_prompts == 5
    assert all(g.to_prompts.out_features == 5 for g in gens)


def test_e_differs_between_tasks_and_moves_with_the_head(cache: str) -> None:
    ds_model, _, _, ds, _ = set_up("downscaling", cache)
    pr_model, _, head, pr, _ = set_up("precipitation", cache)
    E_ds, E_pr = ds.prompt_generators.kernels(ds_model), pr.prompt_generators.kernels(pr_model)
    assert E_ds.shape[1] == 12 and E_pr.shape[1] == 15
    torch.testing.assert_close(E_pr[:, :12], E_ds)  # same frozen backbone kernels ...
    assert E_pr[:, 12:].abs().sum() > 0  # ... plus the task's own
    assert ds.prompt_generators.variables == ds_model.embedding_variables()[:12]

    # the gradient of the prompts reaches the task's kernels (the backbone's are frozen)
    gen = pr.prompt_generators[0]
    gen(pr.prompt_generators.kernels(pr_model)).pow(2).sum().backward()
    for name in TP:
        grad = head.surf_embeds[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert pr_model.encoder.surf_token_embeds.weights["2t"].grad is None
    # ... so a step on the head changes E during training, only in the task's rows
    before = E_pr.detach().clone()
    opt = torch.optim.SGD(head.parameters(), lr=1.0)
    opt.step()
    after = pr.prompt_generators.kernels(pr_model).detach()
    assert torch.equal(after[:, :12], before[:, :12])
    assert not torch.equal(after[:, 12:], before[:, 12:])


# --- the task's prompt count and the ablation -------------------------------------------------


@pytest.mark.parametrize("task,p", [("downscaling", 30), ("postprocessing", 5), ("precipitation", 20)])
def test_runs_use_the_tasks_prompt_count(task: str, p: int, cache: str) -> None:
    cfg = TrainConfig(task=task, method="weatherpeft", task_options=task_options(task, cache))
    _, t, method, _, _ = prepare_run(cfg)
    assert t.num_prompts == p and method.num_prompts == p
    assert all(g.to_prompts.out_features == p for g in method.prompt_generators)
    described = method.describe()  # what summary.json records
    assert described["method_config"]["num_prompts"] == p and described["num_prompts"] == p


def test_an_explicit_prompt_count_overrides_the_tasks(cache: str) -> None:
    cfg = TrainConfig(task="precipitation", method="tadp", method_options={"num_prompts": 7},
                      task_options=task_options("precipitation", cache))
    _, _, method, _, _ = prepare_run(cfg)
    assert method.num_prompts == 7 and method.describe()["method_config"]["num_prompts"] == 7
    # without a task (tests, `wpeft methods`) the default stays 30, and the config says so
    plain = create_method("tadp")
    assert plain.config.num_prompts is None and plain.num_prompts == DEFAULT_PROMPTS == 30
    plain.apply(pretrained_like())
    assert plain.config.num_prompts == 30 and plain.prompt_generators[0].to_prompts.out_features == 30


def generator_shapes(method) -> dict:
    return {k: tuple(v.shape) for k, v in method.prompt_generators.state_dict().items()}


def test_tadp_ablation_is_the_tadp_inside_weatherpeft(cache: str) -> None:
    opts = task_options("precipitation", cache)
    runs = {}
    for name, budget in (("tadp", 0.003), ("tadp", 0.04), ("weatherpeft", 0.04)):
        cfg = TrainConfig(task="precipitation", method=name, budget=budget, task_options=opts)
        _, _, method, _, match = prepare_run(cfg)
        runs[name, budget] = (method, match)
    wp, wp_match = runs["weatherpeft", 0.04]
    for budget in (0.003, 0.04):
        tadp, match = runs["tadp", budget]
        assert match["knob"] is None and match["value"] is None  # no size knob: its own size
        assert match["achieved"] == pytest.approx(tadp.budget_fraction(), abs=1e-12)
        assert tadp.num_prompts == wp.num_prompts == 20
        assert tadp.prompt_generators.variables == wp.prompt_generators.variables
        assert generator_shapes(tadp) == generator_shapes(wp)
        assert tadp.trainable()["added"] == wp.trainable()["added"]
    # the budget probe saw the task's variables: what was matched is what runs
    assert wp_match["knob"] == "keep_ratio"
    assert wp_match["achieved"] == pytest.approx(wp.budget_fraction(), abs=1e-9)
    assert wp.budget_fraction() == pytest.approx(0.04, abs=1e-5)  # k is an integer
    # comparisons run it once, at its own size, like the other methods without a knob
    cells = CompareConfig(tasks=("precipitation",), methods=("tadp", "weatherpeft"),
                          budgets=(0.003, 0.04)).cells()
    assert [(c.method, c.budget) for c in cells] == [
        ("tadp", None), ("weatherpeft", 0.003), ("weatherpeft", 0.04)
    ]


# --- adapters -----------------------------------------------------------------------------------


def test_adapter_from_one_task_is_refused_on_a_task_with_other_variables(tmp_path, cache: str) -> None:
    model, task, _, method, reference = set_up("precipitation", cache)
    with torch.no_grad():
        for p in method.prompt_generators.parameters():
            p.add_(0.01)
    path = save_adapter(method, reference, tmp_path / "adapter", task=task.name)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["prompt_variables"][-3:] == [["surface", n] for n in TP]
    assert meta["method_config"]["num_prompts"] == 20

    # the same task, set up alike: loads, and generates the same prompts
    again = load_pretrained("tiny")
    torch.manual_seed(0)
    again_head = create_task("precipitation", **task_options("precipitation", cache)).setup(again)
    loaded = load_adapter(path, again, again_head)
    E = loaded.prompt_generators.kernels(again)
    torch.testing.assert_close(loaded.prompt_generators[3](E),
                               method.prompt_generators[3](method.prompt_generators.kernels(model)))

    # downscaling (no new variables): refused, naming the variables, model untouched
    other = load_pretrained("tiny")
    other_head = create_task("downscaling", **task_options("downscaling", cache)).setup(other)
    with pytest.raises(CheckpointError, match=r"generators read 15 variables \(task 'precipitation'\); "
                       r"this model's encoder feeds 12: the model lacks tp_12h, tp_24h, tp_36h\. "):
        load_adapter(path, other, other_head)
    assert other.applied_method is None
    # post-processing (other new variables): both sides named
    pp = load_pretrained("tiny")
    pp_head = create_task("postprocessing", **task_options("postprocessing", cache)).setup(pp)
    with pytest.raises(CheckpointError, match=r"feeds 21: the model lacks tp_12h, tp_24h, tp_36h; it "
                       r"has 2t_logscale, .*, q_logscale, which the adapter never saw\."):
        load_adapter(path, pp, pp_head)

    # an adapter written before E read the task's variables (no prompt_variables) is refused
    # on a task that has some
    meta.pop("prompt_variables")
    path.with_suffix(".json").write_text(json.dumps(meta))
    fresh = load_pretrained("tiny")
    fresh_head = create_task("precipitation", **task_options("precipitation", cache)).setup(fresh)
    with pytest.raises(CheckpointError, match=r"built before TADP read a task's variables: they read "
                       r"the backbone's 12; this model's encoder feeds 15: it has tp_12h, tp_24h, "
                       r"tp_36h, which the adapter never saw"):
        load_adapter(path, fresh, fresh_head)
