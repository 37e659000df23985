"""The whole figure set of a comparison, from run directories (``wpeft figures RUN... --out DIR``).

Per run: Fisher-mask heatmap, overlap curves and mask images (selection methods), prompt
attention per recorded block (TADP methods), and skill maps of the task's headline variables.
Across runs of one task: the first run against each other one (A, B and A − B with the
paired-test significance hatched), budget vs skill for all runs, the validation learning
curves of the runs that recorded them (``--eval-every``), and the scorecard of every finished run
against the first one (``scorecard``: its task's headline scores; the first finished run of each
other task is that task's reference, ``<task>-scorecard``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import xarray as xr
from matplotlib.figure import Figure

from wpeft.data.source import on_earth
from wpeft.errors import ConfigError
from wpeft.runs import Run, skill_difference, skill_fields
from wpeft.runs import open as open_run
from wpeft.runs import table as runs_table
from wpeft.runs.curves import curves_table, task_headline
from wpeft.runs.scorecard import scorecard
from wpeft.viz.attention import (
    plot_patch_attention,
    plot_prompt_map,
    plot_prompt_spread,
    plot_variable_attention,
)
from wpeft.viz.curves import plot_learning_curves
from wpeft.viz.fisher import plot_mask_heatmap, plot_mask_image, plot_overlap_curves
from wpeft.viz.scorecard import plot_scorecard
from wpeft.viz.skill import plot_budget_vs_skill, plot_skill_comparison, plot_skill_map
from wpeft.viz.style import save_figure

__all__ = ["write_figure_set"]


def _earth(run: Run) -> bool:
    return on_earth(run.config.get("task_options", {}))


def _field(skill: xr.Dataset, name: str, metric: str) -> xr.DataArray | None:
    """``name`` like ``2m_temperature`` or ``temperature_850`` -> its (lat, lon) skill field."""
    if f"{name}_{metric}" in skill:
        return skill[f"{name}_{metric}"]
    base, _, level = name.rpartition("_")
    if f"{base}_{metric}" in skill and level.isdigit() and "level" in skill[f"{base}_{metric}"].dims:
        da = skill[f"{base}_{metric}"].sel(level=int(level))
        return da.rename(name)
    return None


def write_figure_set(
    run_dirs: Sequence[str | Path], out: str | Path, *, fmt: str = "png", dpi: int = 150
) -> list[Path]:
    """Write every figure for ``run_dirs`` into ``out``; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [open_run(p) for p in run_dirs]
    written: list[Path] = []

    def save(fig: Figure, name: str) -> None:
        path = out / f"{name}.{fmt}"
        save_figure(fig, path, dpi=dpi)
        written.append(path)

    for run in runs:
        name = run.path.name
        fisher = run.fisher
        if fisher is not None:
            save(plot_mask_heatmap(fisher, "density"), f"{name}-fisher-density")
            save(plot_mask_heatmap(fisher, "fisher_mass"), f"{name}-fisher-mass")
            save(plot_overlap_curves(fisher), f"{name}-fisher-overlap")
            if "mask_image" in fisher:
                for matrix in fisher["matrix"].values[:4]:
                    save(plot_mask_image(fisher, str(matrix)), f"{name}-mask-{str(matrix).replace('/', '-')}")
        attention = run.attention
        if attention is not None:
            for block in attention["block"].values:
                tag = f"{name}-attention-{block}"
                save(plot_variable_attention(attention, block), f"{tag}-variables")
                save(plot_patch_attention(attention, block), f"{tag}-patches")
                prompt = attention["prompt"].values[0]
                save(plot_prompt_map(attention, block, prompt, earth=_earth(run)), f"{tag}-prompt{prompt}")
                if "prompt_to_patch" in attention:  # records of format 2
                    fig = plot_prompt_spread(attention, block, prompt, earth=_earth(run))
                    save(fig, f"{tag}-prompt{prompt}-looks")
        if run.fields is not None:
            skill = skill_fields(run, metrics=("rmse",))
            for var in task_headline(run.task):
                da = _field(skill, var, "rmse")
                if da is not None:
                    save(plot_skill_map(da, earth=_earth(run)), f"{name}-rmse-{var}")

    by_task: dict[str, list[Run]] = {}
    for run in runs:
        if run.fields is not None:
            by_task.setdefault(run.task, []).append(run)
    for task, group in by_task.items():
        first = group[0]
        for other in group[1:]:
            diff = skill_difference(first, other, "rmse")
            for var in task_headline(first.task):
                if var not in diff["variable"].values:
                    continue
                d = diff.sel(variable=var)
                fig = plot_skill_comparison(
                    d["metric_a"].rename(var), d["metric_b"].rename(var), d,
                    labels=(first.method, other.method), earth=_earth(first),
                )
                save(fig, f"{task}-{first.path.name}-vs-{other.path.name}-{var}")
        frame = runs_table(group)
        score = next((f"rmse/{v}" for v in task_headline(first.task) if f"rmse/{v}" in frame), None)
        if score is not None and len(frame) > 1:
            save(plot_budget_vs_skill(frame, score=score), f"{task}-budget-vs-skill")
    curves = curves_table(runs)
    for task in dict.fromkeys(curves["task"]):
        save(plot_learning_curves(curves, task=task, title=task), f"{task}-learning-curves")
    finished: dict[str, list[Run]] = {}
    for run in runs:
        if run.finished:
            finished.setdefault(run.task, []).append(run)
    for i, (task, group) in enumerate(finished.items()):
        if len(group) > 1:  # the first run given is the reference
            headline = task_headline(task) or None
            try:
                card = scorecard(group[1:], group[0], variables=headline)
            except ConfigError:
                if headline is None:
                    raise
                card = scorecard(group[1:], group[0])  # runs without the headline variables
            save(plot_scorecard(card), "scorecard" if i == 0 else f"{task}-scorecard")
    return written
