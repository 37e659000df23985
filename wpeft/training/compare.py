"""The paper-style comparison: a matrix of tasks x methods x budgets x seeds.

Each cell is an ordinary run directory (``<root>/<task>/<method>-<budget>-s<seed>``); cells with
a ``summary.json`` are skipped, so an interrupted comparison resumes where it stopped. With
``eval_every`` every run records its validation curve (``metrics.jsonl``).

**Learning rate chosen on the validation split** (``lrs``): per (task, method, budget) every lr
runs at the first seed (``<method>-<budget>-lr<lr>-s<seed>``); the lr whose last validation line
has the lowest headline validation score (:func:`wpeft.runs.curves.headline_val_score`: mean
over the headline variables of score / reference score, e.g. RMSE / bilinear RMSE) is chosen,
written to ``<root>/lr-selection.json``, and only it runs the other seeds; the tables hold the
runs at the chosen lr only. A run that diverges is never chosen. The test split plays no part. The
settings every cell shares (task settings, backbone and its weights) are not in the cell's
name: a root whose finished cells ran with other ones is refused before any run starts. The
tables (markdown + CSV + netCDF) hold mean ± std over seeds of every headline score and the
three sizes of every run (:func:`wpeft.runs.store.run_sizes`: per-step k and the union of
changed entries as % of the backbone, the adapter file in MB and as % of the full fine-tuned
checkpoint); the netCDF's attributes hold each task's settings and the backbone weights the
runs recorded.
Score cells that differ significantly from a
reference method (Full-Tuning by default) are marked, tested on the runs' test fields with the
paired t-test with AR(1) effective sample size over the test times (:func:`reference_marks`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from wpeft.backbones.aurora_adapter import WpeftAurora, check_weights_file
from wpeft.errors import ConfigError, DataError
from wpeft.methods.base import method_class
from wpeft.methods.budget import BudgetInfeasible
from wpeft.runs.curves import headline_val_score, is_headline, task_headline, val_lines
from wpeft.runs.layout import FIELDS, METRICS, SUMMARY, RunFileError, RunLayout, read_json_object
from wpeft.runs.store import Run, run_sizes, write_json_atomic
from wpeft.tasks.base import Task
from wpeft.training.loop import (
    TrainConfig,
    TrainingDiverged,
    match_run_budget,
    probe_setup,
    train,
)

__all__ = [
    "LR_SELECTION", "CompareConfig", "check_budgets", "choose_lrs", "collect", "compare", "lr_selection_table",
    "read_lr_selection", "reference_marks", "tables", "write_tables",
]

#: The learning-rate choice of a comparison with ``lrs``, in its root.
LR_SELECTION = "lr-selection.json"


@dataclass
class CompareConfig:
    """The matrix and the settings shared by its runs (see :class:`TrainConfig`).

    ``task_options`` maps a task of ``tasks`` to its settings (``{"downscaling": {"world":
    {"nlat": 16}}}``), applied to every cell of that task; ``wpeft compare --task-option`` /
    ``--data`` give every task the same ones. ``backbone`` / ``checkpoint`` as in
    :class:`TrainConfig`. Every cell's config is checked when :meth:`cells` builds them, so a
    bad setting is refused before any run starts.

    ``eval_every``: every run evaluates the validation split every that many steps (0: never),
    appending to its ``metrics.jsonl``; ``log_every``: every run appends its training loss
    every that many steps (0: never). Together they are the runs' learning curves.
    ``lrs``: learning rates to choose from on the validation split (see the module doc;
    exclusive with ``lr``; needs ``eval_every >= 1``; the loop evaluates every ``eval_every``
    steps and at the last step).
    """

    tasks: Sequence[str] = ("downscaling",)
    methods: Sequence[str] = ("weatherpeft", "full", "lora")
    budgets: Sequence[float | None] = (None,)
    seeds: Sequence[int] = (0,)
    steps: int = 200
    batch_size: int = 4
    lr: float | None = None  # None: each method's default_lr (Full-Tuning 3e-4, others 1e-3)
    record_every: int = 10  # interval of the Fisher-mask records (selection methods), in steps
    eval_every: int = 0  # interval of the validation evaluations (metrics.jsonl), in steps
    log_every: int = 0  # interval of the training-loss lines (metrics.jsonl), in steps
    lrs: Sequence[float] | None = None  # learning rates chosen from on the validation split
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    backbone: str = "tiny"
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.task_options, dict):
            raise ConfigError(
                f"task_options={self.task_options!r} must map task names to their settings."
            )
        for task, options in self.task_options.items():
            if task not in self.tasks:
                raise ConfigError(
                    f"task_options names task {task!r}, which is not in tasks "
                    f"{list(self.tasks)}; key the settings by a task of the matrix."
                )
            if not isinstance(options, dict):
                raise ConfigError(
                    f"task_options[{task!r}]={options!r} must be a mapping of that task's settings."
                )
        self._check_lr_search()

    def _check_lr_search(self) -> None:
        """``lrs``: distinct positive numbers, not with ``lr``, with validation lines to read."""
        if self.lrs is None:
            return
        self.lrs = tuple(self.lrs)
        if self.lr is not None:
            raise ConfigError(
                f"lr={self.lr} and lrs={list(self.lrs)} exclude each other: give one learning "
                "rate for every run (--lr) or several to choose from (--lrs)."
            )
        if len(self.lrs) < 2 or len(set(self.lrs)) != len(self.lrs):
            raise ConfigError(
                f"lrs={list(self.lrs)} must be at least two different learning rates to choose "
                "from; for one, give --lr."
            )
        bad = [x for x in self.lrs if not (isinstance(x, (int, float)) and 0 < x < float("inf"))]
        if bad:
            raise ConfigError(f"lrs has {bad[0]!r}: every learning rate must be a number > 0.")
        if self.eval_every < 1:
            raise ConfigError(
                f"lrs needs validation lines to choose by: eval_every={self.eval_every} must be "
                f">= 1 (the loop evaluates every eval_every steps and at the last step); give "
                f"e.g. --eval-every {max(1, self.steps // 4)}."
            )

    def cells(self) -> list[TrainConfig]:
        """Every run of the matrix; methods without a size knob run once, at their own size.
        With ``lrs``: every seed at every lr (what :func:`compare` may run; it runs the first
        seed at each lr and the other seeds at the chosen one, see :meth:`planned_runs`)."""
        import wpeft.methods  # noqa: F401  (registration)

        out = []
        for task in self.tasks:
            for method in self.methods:
                cls = method_class(method)
                budgets = self.budgets if cls.size_knob else (None,)
                for budget in budgets:
                    for seed in self.seeds:
                        for lr in self._lrs_of(cls.default_lr):
                            out.append(
                                TrainConfig(
                                    task=task, method=method, budget=budget, seed=seed,
                                    steps=self.steps, batch_size=self.batch_size, lr=lr,
                                    record_every=self.record_every, eval_every=self.eval_every,
                                    log_every=self.log_every,
                                    task_options=dict(self.task_options.get(task, {})),
                                    backbone=self.backbone, checkpoint=self.checkpoint,
                                )
                            )
        return out

    def _lrs_of(self, default_lr: float) -> tuple[float, ...]:
        """The learning rates a method runs at: ``lrs``, else ``lr``, else its default."""
        if self.lrs is not None:
            return tuple(self.lrs)
        return (default_lr if self.lr is None else self.lr,)

    def planned_runs(self) -> int:
        """How many runs :func:`compare` makes (with ``lrs``: per (task, method, budget) one per
        lr at the first seed plus one per further seed)."""
        n = len(self.cells())
        if self.lrs is None:
            return n
        groups = n // (len(self.lrs) * len(self.seeds))
        return groups * (len(self.lrs) + len(self.seeds) - 1)


def run_dir(root: Path, cfg: TrainConfig, *, with_lr: bool = False) -> Path:
    """``<root>/<task>/<method>-<budget>-s<seed>``, with ``-lr<lr>`` before the seed for a
    comparison that chooses the learning rate (``lrs``)."""
    budget = "default" if cfg.budget is None else f"{100 * cfg.budget:g}pct"
    lr = f"-lr{cfg.lr:g}" if with_lr else ""
    return root / cfg.task / f"{cfg.method}-{budget}{lr}-s{cfg.seed}"


def check_finished_cells(cells: Sequence[TrainConfig], root: Path, *, with_lr: bool = False) -> None:
    """Refuse finished cells under ``root`` that ran with other settings than ``cells`` (task
    settings, backbone, weights, batch size: what is not in a cell's name), as a resume would
    (:meth:`TrainConfig.same_run`): learning rate and length may differ. A cell whose
    ``config.json`` cannot be read is left alone."""
    for cfg in cells:
        d = RunLayout(run_dir(root, cfg, with_lr=with_lr))
        if not d.finished:
            continue
        try:
            previous = read_json_object(d.config)
        except RunFileError:
            continue
        differ = cfg.differences(previous) if previous is not None else []
        if differ:
            raise ConfigError(
                f"{d.path} holds a finished run with other settings ({', '.join(differ)} "
                "differ); use another --root for these settings, or remove that run."
            )


def check_budgets(cells: Sequence[TrainConfig]) -> None:
    """Refuse, in one :class:`ConfigError`, every (task, method, budget) of ``cells`` that the
    method cannot reach, each with its smallest (or largest) feasible budget. Budgets are
    matched on probes with the task's variables (:func:`match_run_budget`; each task is set up
    once, :func:`probe_setup`), before any run."""
    probes: dict[str, tuple[Task, WpeftAurora]] = {}
    seen: set[tuple[str, str, float]] = set()
    refused: list[str] = []
    smallest: list[float] = []
    for cfg in cells:
        if cfg.budget is None or (cfg.task, cfg.method, cfg.budget) in seen:
            continue
        seen.add((cfg.task, cfg.method, cfg.budget))
        if cfg.task not in probes:
            probes[cfg.task] = probe_setup(cfg)
        try:
            match_run_budget(cfg, *probes[cfg.task])
        except BudgetInfeasible as e:
            if e.smallest is not None:
                smallest.append(e.smallest)
                bound = f"smallest feasible budget {e.smallest:g}"
            else:
                bound = f"largest feasible budget {e.largest:g}"
            refused.append(f"  {cfg.task} / {cfg.method} / budget {cfg.budget:g}: {bound}")
    if refused:
        hint = f" (--budgets {max(smallest):g} or more suits them)" if smallest else ""
        raise ConfigError(
            f"{len(refused)} cell(s) of the comparison ask for a budget their method cannot "
            "reach; no run was started:\n" + "\n".join(refused) + "\nGive budgets every "
            f"method can reach{hint}, or leave those methods out."
        )


def compare(config: CompareConfig, root: str | Path, *, progress: bool = True) -> list[dict]:
    """Run (or resume) every cell; return the summaries. Every cell's settings, the backbone
    checkpoint (readable), the finished cells under ``root`` (:func:`check_finished_cells`)
    and every budget (:func:`check_budgets`) are checked before the first run starts."""
    root = Path(root)
    cells = config.cells()
    if config.checkpoint is not None:
        check_weights_file(cells[0].checkpoint if cells else config.checkpoint)
    with_lr = config.lrs is not None
    check_finished_cells(cells, root, with_lr=with_lr)
    check_budgets([c for c in cells if not RunLayout(run_dir(root, c, with_lr=with_lr)).finished])
    if config.lrs is not None:
        return _compare_choosing_lr(config, cells, root, progress=progress)
    return [_run_cell(root, cfg, progress=progress) for cfg in cells]


def _run_cell(root: Path, cfg: TrainConfig, *, progress: bool, with_lr: bool = False) -> dict:
    """The summary of one cell: read if finished, else trained (an interrupted cell continues,
    or restarts if killed before its first checkpoint)."""
    d = RunLayout(run_dir(root, cfg, with_lr=with_lr))
    if d.finished:
        return json.loads(d.summary.read_text())
    return train(cfg, d.path, resume=d.path.exists(), progress=progress)


def _group_key(cfg: TrainConfig) -> tuple[str, str, float | None]:
    return cfg.task, cfg.method, cfg.budget


def _compare_choosing_lr(
    config: CompareConfig, cells: Sequence[TrainConfig], root: Path, *, progress: bool
) -> list[dict]:
    """Every lr at the first seed, the choice (:func:`choose_lrs`, written to
    :data:`LR_SELECTION`), then the other seeds at the chosen lr. A first-seed run that
    diverges is left unfinished and never chosen."""
    first = config.seeds[0]
    summaries = []
    for cfg in cells:
        if cfg.seed != first:
            continue
        try:
            summaries.append(_run_cell(root, cfg, progress=progress, with_lr=True))
        except TrainingDiverged as e:
            print(f"wpeft compare: lr {cfg.lr:g} diverged ({e}); it is not chosen.")
    selection = choose_lrs(config, root)
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / LR_SELECTION, selection)
    chosen = _chosen_lrs(selection)
    for cfg in cells:
        if cfg.seed != first and cfg.lr == chosen[_group_key(cfg)]:
            summaries.append(_run_cell(root, cfg, progress=progress, with_lr=True))
    return summaries


#: How :func:`choose_lrs` chooses (recorded in :data:`LR_SELECTION`).
LR_RULE = (
    f"lowest headline validation score of the last val line of {METRICS} at the first seed: "
    "mean over the task's headline variables of score / reference score "
    "(wpeft.runs.curves.headline_val_score); ties go to the first lr given; diverged runs are "
    "never chosen"
)


def choose_lrs(config: CompareConfig, root: str | Path) -> dict[str, Any]:
    """The learning rate of every (task, method, budget) of ``config`` (which has ``lrs``),
    from the first-seed runs under ``root``; reads only their ``metrics.jsonl`` val lines.

    Returns:
        ``{"rule", "seed", "lrs", "choices": [{"task", "method", "budget", "lr", "basis",
        "candidates": [{"lr", "run", "step", "val_score", "diverged"}, ...]}, ...]}`` (what
        :data:`LR_SELECTION` holds; ``val_score`` None for a diverged run).

    Raises:
        DataError: a finished first-seed run has no validation line, or no lr of a group
            gave a finite score.
    """
    if config.lrs is None:
        raise ConfigError("choose_lrs needs a CompareConfig with lrs (learning rates to choose from).")
    root, first = Path(root), config.seeds[0]
    groups: dict[tuple[str, str, float | None], list[TrainConfig]] = {}
    for cfg in config.cells():
        if cfg.seed == first:
            groups.setdefault(_group_key(cfg), []).append(cfg)
    choices = []
    for (task, method, budget), group in groups.items():
        headline, candidates, bases = task_headline(task), [], set()
        for cfg in group:
            path = run_dir(root, cfg, with_lr=True)
            entry: dict[str, Any] = {"lr": cfg.lr, "run": f"{task}/{path.name}", "step": None,
                                     "val_score": None, "diverged": False}
            layout = RunLayout(path)
            if not layout.path.exists():
                raise DataError(f"{path} has not run yet; compare() runs every lr before choosing.")
            if not layout.finished:  # compare() ran it and it did not finish: it diverged
                entry["diverged"] = True
            else:
                lines = val_lines(Run(path))
                if not lines:
                    raise DataError(
                        f"{path} has no validation line in its {METRICS}, so its lr cannot "
                        f"be compared; remove that run and run the comparison again with "
                        f"--eval-every {config.eval_every}."
                    )
                score, basis = headline_val_score(lines[-1], headline)
                entry.update(step=lines[-1]["step"], val_score=score if np.isfinite(score) else None)
                bases.add(basis)
            candidates.append(entry)
        finite = [c for c in candidates if c["val_score"] is not None]
        if not finite:
            tried = ", ".join(f"{c['lr']:g}" for c in candidates)
            raise DataError(
                f"No learning rate of {task} / {method} / budget {budget} gave a finite "
                f"validation score ({tried} diverged or scored NaN); give lower --lrs."
            )
        best = min(finite, key=lambda c: c["val_score"])  # the first of equal scores
        choices.append({"task": task, "method": method, "budget": budget, "lr": best["lr"],
                        "basis": " | ".join(sorted(bases)), "candidates": candidates})
    return {"rule": LR_RULE, "seed": first, "lrs": list(config.lrs), "choices": choices}


def read_lr_selection(root: str | Path) -> dict[str, Any] | None:
    """``<root>/lr-selection.json`` (None if there is none), checked to hold ``choices``."""
    path = Path(root) / LR_SELECTION
    try:
        selection = read_json_object(path)
    except RunFileError as e:
        raise DataError(f"{e}; run the comparison again to write it anew.") from None
    if selection is None:
        return None
    choices = selection.get("choices")
    if not isinstance(choices, list) or not all(
        isinstance(c, dict) and {"task", "method", "budget", "lr"} <= c.keys() for c in choices
    ):
        raise DataError(
            f"{path} has no list of choices with task, method, budget and lr; remove it and run "
            "the comparison again to write it anew."
        )
    return selection


def _chosen_lrs(selection: dict[str, Any] | None) -> dict[tuple[str, str, float | None], float]:
    """(task, method, budget) -> the chosen lr of a selection (empty without one)."""
    if selection is None:
        return {}
    return {(c["task"], c["method"], c["budget"]): c["lr"] for c in selection["choices"]}


def _summaries_at_chosen_lr(root: Path) -> tuple[list[dict], dict[str, Any] | None]:
    """The summaries of the finished runs under ``root`` and its lr selection; with one, of a
    chosen (task, method, budget) only the runs at its chosen lr. Two runs of the same task,
    method, budget and seed are refused (they would be one cell of the tables)."""
    selection = read_lr_selection(root)
    chosen = _chosen_lrs(selection)
    rows, seen = [], {}
    for d in sorted(root.glob("*/*")):
        layout = RunLayout(d)
        if not layout.finished:
            continue
        row = json.loads(layout.summary.read_text())
        key = (row["task"], row["method"], row["budget"])
        if key in chosen and (read_json_object(layout.config) or {}).get("lr") != chosen[key]:
            continue
        cell = (*key, row["seed"])
        if cell in seen:
            raise DataError(
                f"{seen[cell]} and {d} are both runs of {row['task']} / {row['method']} / budget "
                f"{row['budget']} / seed {row['seed']} (at other learning rates?); an interrupted "
                f"`wpeft compare --lrs` has not written {LR_SELECTION} yet: run it again to "
                "finish, or remove one of the runs."
            )
        seen[cell] = d
        rows.append(row)
    return rows, selection


def _budget_label(budget: float | None) -> str:
    """The ``budget`` coordinate of :func:`collect` for a run's recorded budget fraction."""
    return "default" if budget is None else f"{100 * budget:g}%"


#: The size variables of :func:`collect`: name -> (``run_sizes`` key, scale, units, long name).
SIZE_VARIABLES = {
    "budget_percent": ("budget_fraction", 100.0, "%", "per-step k, % of backbone"),
    "changed_percent": ("changed_fraction", 100.0, "%", "changed (union), % of backbone"),
    "adapter_bytes": ("adapter_bytes", 1.0, "B", "adapter file size"),
    "adapter_percent": ("adapter_fraction", 100.0, "%", "adapter, % of the full checkpoint"),
}


def collect(root: str | Path) -> xr.Dataset:
    """All finished runs under ``root`` as one Dataset with dims (task, method, budget, seed):
    one variable per score plus the sizes of :data:`SIZE_VARIABLES` (``budget_percent``: per-step
    k, ``changed_percent``: union of changed entries, both % of backbone; ``adapter_bytes`` and
    ``adapter_percent`` of the full checkpoint; NaN where a run did not record what it needs).
    With an :data:`LR_SELECTION` only the runs at each chosen lr, and the choice in
    ``attrs["lr_selection"]``; the ``root`` attribute names the directory (where :func:`tables`
    finds the runs' test fields)."""
    rows, selection = _summaries_at_chosen_lr(Path(root))
    if not rows:
        raise FileNotFoundError(f"No finished runs ({SUMMARY}) under {root}.")
    tasks = sorted({r["task"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    budgets = sorted({_budget_label(r["budget"]) for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    keys = sorted({k for r in rows for k in r["scores"]}) + list(SIZE_VARIABLES)
    data = {k: np.full((len(tasks), len(methods), len(budgets), len(seeds)), np.nan) for k in keys}
    for r in rows:
        b = _budget_label(r["budget"])
        idx = (tasks.index(r["task"]), methods.index(r["method"]), budgets.index(b), seeds.index(r["seed"]))
        for k, v in r["scores"].items():
            data[k][idx] = v
        sizes = run_sizes(r)
        for name, (key, scale, _, _) in SIZE_VARIABLES.items():
            data[name][idx] = scale * sizes[key]
    dims = ("task", "method", "budget", "seed")
    out = xr.Dataset(
        {k.replace("/", ":"): (dims, v) for k, v in data.items()},
        coords={"task": tasks, "method": methods, "budget": budgets, "seed": seeds},
        attrs={**_shared_settings(rows, tasks), **_selection_attrs(selection),
               "root": str(Path(root).resolve())},
    )
    for name, (_, _, units, long_name) in SIZE_VARIABLES.items():
        out[name].attrs.update(units=units, long_name=long_name)
    return out


def _selection_attrs(selection: dict[str, Any] | None) -> dict[str, str]:
    """``lr_selection``: the lr choice as JSON text (none without one)."""
    return {} if selection is None else {"lr_selection": json.dumps(selection, sort_keys=True)}


def _shared_settings(rows: list[dict], tasks: list[str]) -> dict[str, str]:
    """JSON text of what the runs recorded about their task (``task_config:<task>``) and
    backbone weights (``backbone_weights``): the one value all runs share, or a JSON list of
    the different values when runs differ."""

    def one_or_all(values: list[Any]) -> str:
        texts = list(dict.fromkeys(json.dumps(v, sort_keys=True) for v in values))
        return texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"

    attrs = {
        f"task_config:{task}": one_or_all([r.get("task_config") for r in rows if r["task"] == task])
        for task in tasks
    }
    attrs["backbone_weights"] = one_or_all([r.get("backbone_weights") for r in rows])
    return attrs


#: Scores of a reference that does not depend on the method (shown once, as its own row).
#: Score prefix -> (reference name, the method score it stands beside).
REFERENCES = {
    "rmse_bilinear": ("bilinear interpolation", "rmse"),
    "rmse_persistence": ("persistence", "rmse"),
    "acc_persistence": ("persistence", "acc"),
    "seeps_persistence": ("persistence", "seeps"),
    "crps_raw": ("raw ensemble", "crps"),
    "rmse_raw": ("raw ensemble", "rmse"),
}


def _headline_columns(sub: xr.Dataset, task: str) -> tuple[list[str], dict[str, list[str]]]:
    """Score columns of the task's headline variables, and reference columns by prefix."""
    headline = task_headline(task)
    main, refs = [], {}
    for v in sub.data_vars:
        if v in SIZE_VARIABLES or not np.isfinite(sub[v]).any():
            continue
        prefix, _, var = str(v).partition(":")
        if not is_headline(var, headline):
            continue
        if prefix in REFERENCES:
            refs.setdefault(prefix, []).append(str(v))
        else:
            main.append(str(v))
    return main, refs


#: The size columns of :func:`tables` (see :func:`size_cells`).
SIZE_COLUMNS = ("k % (per step)", "changed % (union)", "adapter MB (% of full)")


def _spread(x: np.ndarray) -> str:
    """Finite values of a size: one value when every seed agrees, else mean ± std ('-': none)."""
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return "-"
    return f"{x[0]:.4g}" if np.all(x == x[0]) else f"{x.mean():.4g} ± {x.std():.2g}"


def size_cells(cell: xr.Dataset) -> list[str]:
    """The :data:`SIZE_COLUMNS` cells of one (method, budget) over its seeds: k %, changed %,
    and ``<MB> (<%>%)`` of the adapter (``<MB>`` alone when the full checkpoint is unknown)."""
    mb = _spread(cell["adapter_bytes"].values / 1e6)
    percent = _spread(cell["adapter_percent"].values)
    adapter = mb if mb == "-" or percent == "-" else f"{mb} ({percent}%)"
    k, changed = _spread(cell["budget_percent"].values), _spread(cell["changed_percent"].values)
    return [k, changed, adapter]


def tables(results: xr.Dataset, reference: str | None = "full") -> dict[str, str]:
    """One markdown table per task: rows method x budget, columns the three sizes
    (:data:`SIZE_COLUMNS`) and the headline scores, cells mean ± std over seeds (sizes: one
    value when the seeds agree); references last. Score cells significantly different from
    method ``reference`` carry a :data:`MARKER`, explained by a line under the table
    (:func:`reference_marks`; none when ``reference`` is None or not in the matrix)."""
    out = {}
    for task in results.task.values:
        sub = results.sel(task=task)
        main, refs = _headline_columns(sub, str(task))
        marks, note = reference_marks(results, str(task), main, reference)
        names = list(SIZE_COLUMNS) + [c.replace(":", " ") for c in main]
        lines = ["| method | budget | seeds | " + " | ".join(names) + " |", "|---" * (len(names) + 3) + "|"]

        def fmt(x: np.ndarray) -> str:
            x = x[np.isfinite(x)]
            if len(x) == 0:
                return "-"
            return f"{x.mean():.4g} ± {x.std():.2g}" if len(x) > 1 else f"{x.mean():.4g}"

        for method in sub.method.values:
            for budget in sub.budget.values:
                cell = sub.sel({"method": method, "budget": budget})
                n = int(np.isfinite(cell["budget_percent"]).sum())
                if n:
                    vals = size_cells(cell) + [
                        fmt(cell[c].values) + marks.get((method, budget, c), "") for c in main
                    ]
                    lines.append(f"| {method} | {budget} | {n} | " + " | ".join(vals) + " |")
        labels = dict.fromkeys(REFERENCES[p][0] for p in refs)
        for label in labels:
            vals = ["-"] * len(SIZE_COLUMNS)
            for c in main:
                metric, _, var = c.partition(":")
                ref = next(
                    (f"{p}:{var}" for p in refs if REFERENCES[p] == (label, metric)), None
                )
                x = sub[ref].values.ravel() if ref in sub else np.array([])
                x = x[np.isfinite(x)]
                vals.append(f"{x[0]:.4g}" if len(x) else "-")  # the same for every method
            lines.append(f"| *{label}* | - | - | " + " | ".join(vals) + " |")
        if note:
            lines += ["", note]
        out[str(task)] = "\n".join(lines)
    return out


def lr_selection_table(selection: dict[str, Any]) -> str:
    """The lr choice as one markdown table: task, method, budget, each lr's validation score
    (``diverged`` for a run that did not finish) and the chosen lr."""
    lrs = list(selection.get("lrs") or dict.fromkeys(
        c["lr"] for choice in selection["choices"] for c in choice.get("candidates", [])
    ))
    head = ["task", "method", "budget", *(f"val score lr {lr:g}" for lr in lrs), "chosen lr"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for choice in selection["choices"]:
        by_lr = {c["lr"]: c for c in choice.get("candidates", [])}
        scores = []
        for lr in lrs:
            c = by_lr.get(lr)
            if c is None:
                scores.append("-")
            elif c.get("diverged"):
                scores.append("diverged")
            else:
                scores.append("-" if c.get("val_score") is None else f"{c['val_score']:.4g}")
        budget = _budget_label(choice["budget"])
        lines.append(f"| {choice['task']} | {choice['method']} | {budget} | "
                     + " | ".join(scores) + f" | {choice['lr']:g} |")
    return "\n".join(lines)


def _write_lr_selection(results: xr.Dataset, out: Path) -> list[Path]:
    """``lr-selection.md`` from ``results.attrs["lr_selection"]`` (nothing without it)."""
    if "lr_selection" not in results.attrs:
        return []
    path = out / "lr-selection.md"
    path.write_text(lr_selection_table(json.loads(results.attrs["lr_selection"])) + "\n")
    return [path]


def _write_curves(results: xr.Dataset, runs_root: Path, out: Path) -> list[Path]:
    """``<task>-curves.csv`` (every validation line of the task's runs) and ``<task>-curves.png``
    (the runs at the chosen lr; needs matplotlib) for each task whose runs have curves."""
    from wpeft.runs.curves import curves_table

    selection = results.attrs.get("lr_selection")
    chosen = _chosen_lrs(json.loads(selection) if selection else None)
    paths = []
    for task in map(str, results.task.values):
        df = curves_table(runs_root / task)
        if df.empty:
            continue
        csv = out / f"{task}-curves.csv"
        df.to_csv(csv, index=False)
        paths.append(csv)
        keep = [
            chosen.get((t, m, None if np.isnan(b) else b), lr) == lr
            for t, m, b, lr in zip(df["task"], df["method"], df["budget"], df["lr"])
        ]
        try:
            from wpeft.viz.curves import plot_learning_curves
            from wpeft.viz.style import save_figure
        except ImportError:  # matplotlib is the viz extra: the CSV is written without it
            continue
        png = out / f"{task}-curves.png"
        save_figure(plot_learning_curves(df[keep], title=task), png)
        paths.append(png)
    return paths


#: Marks a score cell that differs significantly from the reference method (:func:`reference_marks`).
MARKER = "*"
#: Marks a score cell whose paired losses are too autocorrelated to test: the AR(1) effective
#: sample size is at most 1 (the differences vary, but carry one independent value or less).
UNTESTABLE = "†"
#: Score metrics with a per-time loss to pair (:func:`wpeft.runs.skill.domain_mean_losses`);
#: the others (acc, seeps) are not tested.
_PAIRED_METRICS = ("rmse", "mae", "crps", "bias")


def _runs_with_fields(task_dir: Path) -> dict[tuple[str, str, int], Path]:
    """``fields.nc`` of the finished runs in ``task_dir`` by (method, budget label, seed); after
    an lr search only the runs at the chosen lr (as :func:`collect`)."""
    out = {}
    chosen = _chosen_lrs(read_lr_selection(task_dir.parent))
    for d in sorted(task_dir.glob("*")):
        layout = RunLayout(d)
        if layout.finished and layout.has_fields:
            r = json.loads(layout.summary.read_text())
            key = (r["task"], r["method"], r["budget"])
            if key in chosen and (read_json_object(layout.config) or {}).get("lr") != chosen[key]:
                continue  # another lr of an lr search: not in the tables
            out[(r["method"], _budget_label(r["budget"]), int(r["seed"]))] = layout.fields
    return out


def reference_marks(
    results: xr.Dataset,
    task: str,
    columns: Sequence[str],
    reference: str | None = "full",
    alpha: float = 0.05,
) -> tuple[dict[tuple[str, str, str], str], str]:
    """Which score cells of ``task`` differ significantly from the ``reference`` method.

    For each row (method, budget) and score column ``<metric>:<variable>`` with a per-time loss
    (rmse: squared error, mae, crps, bias), the latitude-weighted domain mean of the loss per
    test time (:func:`wpeft.runs.skill.domain_mean_losses`) of the method is paired over test
    times with the reference's and tested two-sided with the paired t-test with the AR(1)
    effective sample size (:func:`wpeft.metrics.significance.paired_ttest_ar1`). With several
    seeds, only the seeds both have are used: the per-time losses are averaged over them on
    each side (seed paired with seed) before the test. The reference is taken at the row's
    budget, or at its only one (e.g. Full-Tuning's ``default``). Rows of the reference itself,
    cells whose runs have no ``fields.nc`` (under ``results.attrs["root"]``) or other test times,
    and columns without a per-time loss (acc, seeps) are not marked.

    Returns:
        ``{(method, budget, column): MARKER}`` for significant cells (:data:`UNTESTABLE` where
        the differences vary but their AR(1) effective sample size is 1 or less, so the test has
        no degrees of freedom), and the line to print under
        the table (empty when ``reference`` is None or not a method of ``results``).
    """
    from wpeft.metrics.significance import TEST_NAMES, paired_ttest_ar1
    from wpeft.runs.skill import domain_mean_losses

    if reference is None or reference not in results.method.values:
        return {}, ""
    root = results.attrs.get("root")
    runs = _runs_with_fields(Path(root) / task) if root else {}
    metrics = sorted({c.partition(":")[0] for c in columns} & set(_PAIRED_METRICS))
    cache: dict[Path, dict[str, dict[str, xr.DataArray]]] = {}

    def seed_mean(method: str, budget: str, seeds: list[int], column: str) -> xr.DataArray | None:
        """Per-time loss ``(time,)`` of ``column`` averaged over ``seeds``; None where a run
        lacks it."""
        metric, _, var = column.partition(":")
        series = []
        for s in seeds:
            path = runs[method, budget, s]
            if path not in cache:  # every needed metric at once: the file is read once
                with xr.open_dataset(path, engine="netcdf4") as ds:
                    cache[path] = {m: domain_mean_losses(ds, m) for m in metrics}  # type: ignore[arg-type]
            series.append(cache[path][metric].get(var))
        if any(x is None for x in series):
            return None
        return xr.concat(series, dim="seed", join="exact").mean("seed")

    ref_budgets = sorted({b for m, b, _ in runs if m == reference})
    marks: dict[tuple[str, str, str], str] = {}
    tested = 0
    for method, budget in sorted({(m, b) for m, b, _ in runs if m != reference}):
        if budget in ref_budgets:
            ref_budget = budget
        elif len(ref_budgets) == 1:
            ref_budget = ref_budgets[0]
        else:  # no reference run, or at other budgets only: nothing clear to compare with
            continue
        seeds = sorted(
            s for m, b, s in runs
            if (m, b) == (method, budget) and (reference, ref_budget, s) in runs
        )
        for column in columns:
            if column.partition(":")[0] not in metrics or not seeds:
                continue
            try:
                a = seed_mean(method, budget, seeds, column)
                b = seed_mean(reference, ref_budget, seeds, column)
                if a is None or b is None:
                    continue
                a, b = xr.align(a, b, join="exact")  # the same test times
                test = paired_ttest_ar1(a.values, b.values)
            except (ValueError, DataError):  # other test times, or a single one
                continue
            tested += 1
            if test.pvalue < alpha:
                marks[method, budget, column] = MARKER
            elif test.n_eff <= 1 and not np.all(a.values - b.values == (a.values - b.values)[0]):
                marks[method, budget, column] = UNTESTABLE
    if not tested:
        return {}, (
            f"No significance markers: no pair of runs of {reference} and another method with "
            f"test fields ({FIELDS}) on the same test times under {root}, or no score with a "
            "per-time loss (rmse, mae, crps, bias)."
        )
    untested = sorted({c.partition(":")[0] for c in columns} - set(_PAIRED_METRICS))
    return marks, (
        f"Scores marked {MARKER} differ from {reference}'s at p < {alpha} "
        f"({TEST_NAMES['ttest_ar1']} over the test times of the latitude-weighted domain-mean "
        "loss per time, squared error for rmse; seeds paired and their losses averaged per time)"
        + (f"; {', '.join(untested)} not tested" if untested else "")
        + (f"; {UNTESTABLE}: not testable, the per-time loss differences are so autocorrelated "
           "that their effective sample size is 1 or less." if UNTESTABLE in marks.values() else ".")
    )


def write_tables(
    results: xr.Dataset,
    out_dir: str | Path,
    reference: str | None = "full",
    *,
    runs_root: str | Path | None = None,
    markdown: dict[str, str] | None = None,
) -> list[Path]:
    """Markdown (:func:`tables`, markers against ``reference``) and CSV per task plus the whole
    Dataset as netCDF; with an lr choice (``results.attrs["lr_selection"]``) ``lr-selection.md``;
    with ``runs_root`` (what :func:`collect` read) the learning curves ``<task>-curves.csv`` /
    ``.png`` of the tasks whose runs recorded validation lines. ``markdown``: what
    ``tables(results, reference)`` already gave (the marks read every run's test fields, so a
    caller that printed them need not read them again). Returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for task, md in (markdown if markdown is not None else tables(results, reference)).items():
        p = out / f"{task}.md"
        p.write_text(md + "\n")
        paths.append(p)
        df = results.sel(task=task).to_dataframe().dropna(how="all")
        c = out / f"{task}.csv"
        df.to_csv(c)
        paths.append(c)
    nc = out / "comparison.nc"
    results.to_netcdf(nc)
    paths.append(nc)
    paths += _write_lr_selection(results, out)
    if runs_root is not None:
        paths += _write_curves(results, Path(runs_root), out)
    return paths

