"""Plotting library: pure functions from xarray/pandas data to figures (no model in sight).

One function per view, in two flavours:

* matplotlib (``plot_*``, return a :class:`matplotlib.figure.Figure` made without pyplot, so they
  work headless, in notebooks and in Panel): :mod:`~wpeft.viz.fisher` (Fisher-mask records),
  :mod:`~wpeft.viz.attention` (TADP prompt attention), :mod:`~wpeft.viz.skill` (skill maps,
  comparisons, budget vs skill), :mod:`~wpeft.viz.curves` (validation learning curves); ``earth=True`` maps use cartopy with **local** coastline data
  only (:mod:`~wpeft.viz.maps`);
* HoloViews (``hv_*``, return HoloViews objects for the bokeh backend):
  :mod:`~wpeft.viz.interactive`.

Colormaps, labels with units and :func:`save_figure` live in :mod:`~wpeft.viz.style`.
Needs the ``viz`` extra (matplotlib; cartopy for Earth maps; holoviews + bokeh for ``hv_*``).
"""

from wpeft.viz.attention import plot_patch_attention, plot_prompt_map, plot_variable_attention
from wpeft.viz.curves import plot_learning_curves, plot_training_curves
from wpeft.viz.fisher import (
    plot_mask_heatmap,
    plot_mask_image,
    plot_mask_layers,
    plot_overlap_curves,
)
from wpeft.viz.interactive import (
    hv_budget_vs_skill,
    hv_curves,
    hv_mask_heatmap,
    hv_mask_image,
    hv_overlap_curves,
    hv_patch_attention,
    hv_prompt_map,
    hv_scorecard,
    hv_skill_comparison,
    hv_skill_map,
    hv_variable_attention,
)
from wpeft.viz.maps import display_longitudes, find_coastlines
from wpeft.viz.skill import plot_budget_vs_skill, plot_skill_comparison, plot_skill_map
from wpeft.viz.style import colorbar_label, save_figure

__all__ = [
    "colorbar_label",
    "display_longitudes",
    "find_coastlines",
    "hv_budget_vs_skill",
    "hv_curves",
    "hv_mask_heatmap",
    "hv_mask_image",
    "hv_overlap_curves",
    "hv_patch_attention",
    "hv_prompt_map",
    "hv_scorecard",
    "hv_skill_comparison",
    "hv_skill_map",
    "hv_variable_attention",
    "plot_budget_vs_skill",
    "plot_learning_curves",
    "plot_mask_heatmap",
    "plot_mask_image",
    "plot_mask_layers",
    "plot_overlap_curves",
    "plot_patch_attention",
    "plot_prompt_map",
    "plot_skill_comparison",
    "plot_skill_map",
    "plot_training_curves",
    "plot_variable_attention",
    "save_figure",
]
