"""The workbench: a Panel dashboard over a runs directory, built once per browser session.

Seven views, each drawn with the HoloViews functions of :mod:`wpeft.viz.interactive` (no plotting
code lives here):

* **Overview** — the runs table (:meth:`~wpeft.app.catalog.Catalog.table`) in a sortable
  Tabulator; clicking a row selects that run everywhere; a run whose files cannot be read is
  listed with its problem (a ``problem`` column next to its name);
* **Fisher masks** — per-layer mask heatmap over training, a step player driving one weight
  matrix's mask image, and the overlap curves (image and curves are the :mod:`wpeft.viz.fisher`
  figures as PNGs, rendered once per records version for all sessions:
  :meth:`~wpeft.app.catalog.Catalog.record_png`);
* **Prompt attention** — variable x variable and variable x patch attention and a prompt
  token's attention map, per block and record step;
* **Skill maps** — run A and run B side by side and A − B with the paired-test significance,
  per variable, level / lead and metric (one run alone: its map);
* **Budget vs skill** — every finished run of a task on one plot, x the size the user picks
  (per-step k, the union of changed entries, or the adapter file's share of a full checkpoint).
* **Curves** — training loss and validation scores per step of the runs chosen under
  *Compare runs* (``Selection.runs``; run A alone by default), log/linear y, EMA smoothing,
  redrawn while a run appends to ``metrics.jsonl``;
* **Scorecard** — the chosen runs' test scores against a reference run
  (:func:`wpeft.runs.scorecard.scorecard`), binned % difference, blue = better.

Every view has "download figure" (the :mod:`wpeft.viz` matplotlib figure, PNG at 200 dpi) and
"download data" (CSV or netCDF) buttons, computed on click (:meth:`View.downloads`).

Design. :func:`build_workbench` makes everything a session owns (a :class:`Selection`, the
widgets, the panes) inside the call, so sessions never share state; the data behind them come
from the process-wide :class:`~wpeft.app.catalog.Catalog` (read once, confined to RUNS_DIR).
A view's widgets and panes are made when it is first opened (:class:`LazyViews`), and only the
shown view is in the page.
The :class:`Selection` is the single source of truth: widgets write to it, views redraw from it,
and ``pn.state.location.sync`` mirrors it in the URL query, so a view can be shared by copying
the address. Values from the URL are untrusted: run names go through
:meth:`~wpeft.app.catalog.Catalog.resolve` and any other unknown value falls back to a default.
One :class:`~wpeft.app.catalog.RunsWatcher` per server compares
:meth:`~wpeft.app.catalog.Catalog.signature` (a few ``stat`` calls) for all sessions and has a
session redraw its visible view only when a run it shows wrote something new.
"""

from __future__ import annotations

import html
import io
import json
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pandas as pd
import panel as pn
import param

from wpeft.app.catalog import Catalog, RunEntry, RunNameError, catalog_for, split_variable
from wpeft.errors import ConfigError, DataError, WpeftError
from wpeft.runs.layout import METRICS

__all__ = [
    "VIEWS", "Selection", "Workbench", "build_workbench", "runs_dir_from_argv", "workbench_view",
]

log = logging.getLogger(__name__)

#: View key (the ``view`` URL parameter) -> tab title.
VIEWS = {
    "overview": "Overview",
    "fisher": "Fisher masks",
    "attention": "Prompt attention",
    "skill": "Skill maps",
    "budget": "Budget vs skill",
    "curves": "Curves",
    "scorecard": "Scorecard",
}

#: Columns of a runs table that are not scores (everything else is a score column).
_RUN_COLUMNS = (
    "run", "path", "task", "method", "budget", "seed", "finished", "steps",
    "trainable_backbone", "trainable_total", "changed_backbone", "changed_total",
    "budget_fraction", "changed_fraction", "adapter_bytes", "adapter_fraction",
    "encoder_decoder_policy", "train_seconds", "problem",
)
#: The three sizes as the runs table shows them: ``run_sizes`` key -> (column, scale).
_SIZE_COLUMNS = {
    "budget_fraction": ("k_%", 100.0),
    "changed_fraction": ("changed_%", 100.0),
    "adapter_bytes": ("adapter_MB", 1e-6),
    "adapter_fraction": ("adapter_%", 100.0),
}
#: The sizes' columns as the runs table shows them (not scores).
_SHOWN_SIZES = ("budget_%", *(column for column, _ in _SIZE_COLUMNS.values()))
#: Choices of the budget-vs-skill x axis: label -> ``run_sizes`` key.
_SIZE_CHOICES = {
    "per-step k": "budget_fraction",
    "changed (union)": "changed_fraction",
    "adapter (% of full)": "adapter_fraction",
}
_SELECTION_METHODS = "weatherpeft, sfas, fish and child_tuning_d"
_NO_RUN = "— choose a run —"
_NO_RUN_B = "— none (one run only) —"

_CSS = """
.wb-alert { padding: 0.6em 1em; border-radius: 4px; border: 1px solid; margin: 2px 0;
            font-size: 14px; line-height: 1.4; }
.wb-alert-error { background: #fdecea; border-color: #f1aeb5; color: #58151c; }
.wb-alert-info { background: #e7f1fb; border-color: #9ec5fe; color: #052c65; }
.wb-alert code { background: rgba(0, 0, 0, 0.06); padding: 0 3px; border-radius: 3px; }
"""

METRIC_LABELS = {"rmse": "RMSE", "bias": "bias (mean error)", "crps": "CRPS (Gaussian)"}


# --------------------------------------------------------------------------- small helpers


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _md(value: Any) -> str:
    """Text from the file system (run, block, matrix names) made inert inside Markdown."""
    return html.escape(_text(value), quote=False)


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _pick(value: Any, options: Sequence[Any], default: Any = None) -> Any:
    """``value`` if it is one of ``options`` (compared as text: URL values arrive parsed),
    else ``default`` (the first option when None)."""
    for option in options:
        if _text(option) == _text(value):
            return option
    if default is not None:
        return default
    return options[0] if len(options) else None


def alert_html(text: str, kind: str = "error", code: Sequence[str] = ()) -> str:
    """An alert box; ``text`` is escaped (it may hold user input), and each ``{}`` in it is
    filled with the matching ``code`` item, escaped and set in ``<code>``."""
    parts = html.escape(text).split("{}")
    body = parts[0]
    for snippet, rest in zip(code, parts[1:]):
        body += f"<code>{html.escape(snippet)}</code>{rest}"
    role = "alert" if kind == "error" else "status"
    return f'<div class="wb-alert wb-alert-{kind}" role="{role}">{body}</div>'


def _message_pane(css_class: str) -> pn.pane.HTML:
    return pn.pane.HTML("", stylesheets=[_CSS], css_classes=["wb-message", css_class],
                        sizing_mode="stretch_width", visible=False)


def _plot_pane(css_class: str) -> pn.pane.HoloViews:
    return pn.pane.HoloViews(None, css_classes=["wb-plot", css_class], linked_axes=False,
                             sizing_mode="stretch_width")


def runs_dir_from_argv(argv: Sequence[str]) -> Path:
    """RUNS_DIR from ``panel serve apps/workbench.py --args RUNS_DIR`` (or ``$WPEFT_RUNS_DIR``)."""
    args = [a for a in argv if a]
    if args:
        return Path(args[0])
    env = os.environ.get("WPEFT_RUNS_DIR")
    if env:
        return Path(env)
    raise SystemExit(
        "The workbench needs a runs directory: `panel serve apps/workbench.py --args RUNS_DIR` "
        "or `wpeft serve RUNS_DIR`."
    )


# --------------------------------------------------------------------------- per-session state


class Selection(param.Parameterized):
    """What one session shows. Every parameter is mirrored in the URL query under its own name;
    values are kept as given (URL text arrives parsed to numbers or booleans) and validated
    where they are used."""

    view = param.Parameter(default="overview", doc="Tab: one of VIEWS.")
    run = param.Parameter(default="", doc="Run name (relative to RUNS_DIR); run A in Skill.")
    run_b = param.Parameter(default="", doc="Run B of the skill comparison ('' = none).")
    record = param.Parameter(default="density", doc="Fisher record shown in the heatmap.")
    tensor = param.Parameter(default="", doc="Tensor kind ('' = aggregated over kinds).")
    step = param.Parameter(default=None, doc="Fisher record step (None = the last).")
    matrix = param.Parameter(default="", doc="Weight matrix of the mask image.")
    blocks = param.Parameter(default="", doc="Comma-separated blocks of the overlap curves.")
    block = param.Parameter(default="", doc="Block of the prompt-attention views.")
    prompt = param.Parameter(default=None, doc="Prompt token of the prompt map.")
    att_step = param.Parameter(default=None, doc="Attention record step (None = the last).")
    variable = param.Parameter(default="", doc="Skill variable (base name).")
    level = param.Parameter(default="", doc="Level (hPa) or lead ('12h') of the variable.")
    metric = param.Parameter(default="rmse", doc="Skill metric.")
    task = param.Parameter(default="", doc="Task of the budget-vs-skill plot.")
    score = param.Parameter(default="", doc="Score column of the budget-vs-skill plot.")
    size = param.Parameter(default="budget_fraction",
                           doc="Size on the budget-vs-skill x axis: one of _SIZE_CHOICES' values.")
    runs = param.Parameter(default="", doc="Comma-separated runs compared in Curves, Scorecard "
                                            "and Budget vs skill ('' = each view's default).")
    curve = param.Parameter(default="train:loss", doc="Curves: '<split>:<column>' plotted.")
    logy = param.Parameter(default=False, doc="Curves: logarithmic y axis.")
    smoothing = param.Parameter(default=0.0, doc="Curves: EMA weight in [0, 0.99] (0: raw).")
    reference = param.Parameter(default="", doc="Scorecard reference run ('' = the default).")
    columns = param.Parameter(default="", doc="Overview: comma-separated score columns shown "
                                              "('' = the scores of each task's headline "
                                              "variables).")


#: Parameters mirrored in the URL (query name = parameter name).
URL_PARAMETERS = [p for p in Selection.param if p != "name"]


# --------------------------------------------------------------------------- views


class View:
    """One tab: a message line, a caption and the view's widgets and plots. Subclasses fill
    :meth:`draw` (and may draw parts on :meth:`on_selection`)."""

    key = ""
    watches: tuple[str, ...] = ()

    def __init__(self, wb: Workbench) -> None:
        self.wb = wb
        self.sel = wb.sel
        self.cat = wb.cat
        self.stale = True
        self._drawing = False
        #: What the last draw raised (shown in :attr:`message`), None when it drew.
        self.error: BaseException | None = None
        self.message = _message_pane(f"wb-{self.key}-message")
        self.caption = pn.pane.Markdown("", css_classes=["wb-caption", f"wb-{self.key}-caption"],
                                        sizing_mode="stretch_width", margin=(0, 10))
        self.content = pn.Column(sizing_mode="stretch_width")
        self.panel = pn.Column(self.message, self.caption, self.content,
                               sizing_mode="stretch_width", css_classes=[f"wb-view-{self.key}"])
        if self.watches:
            self.sel.param.watch(self._selection_changed, list(self.watches))

    @property
    def active(self) -> bool:
        return self.sel.view == self.key

    def refresh(self) -> None:
        """Redraw now if visible, else when the tab is next opened."""
        if not self.active:
            self.stale = True
            return
        self.stale = False
        self._guarded(self.draw)

    def _guarded(self, fn: Callable[[], None]) -> None:
        self._drawing = True
        self.message.visible = False
        self.error = None
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 -- any failure becomes a message in the page
            self.error = exc
            self.show_error(exc)
        else:
            self.content.visible = True
        finally:
            self._drawing = False

    def show_error(self, exc: BaseException) -> None:
        if isinstance(exc, RunNameError) and exc.reason == "empty" and not self.cat.runs():
            self.message.object = self.wb.no_runs_html()
        elif isinstance(exc, WpeftError):
            self.message.object = alert_html(self.cat.sanitize(str(exc)))
        else:
            log.exception("workbench view %s failed", self.key)
            self.message.object = alert_html(
                f"Could not draw this view ({type(exc).__name__}); the server log has details."
            )
        self.message.visible = True
        self.content.visible = False
        self.caption.object = ""

    def _selection_changed(self, *events: param.parameterized.Event) -> None:
        if self._drawing or not self.active:
            if not self.active:
                self.stale = True
            return
        names = {e.name for e in events}
        self._guarded(lambda: self.on_selection(names))

    def on_selection(self, names: set[str]) -> None:
        """A watched selection parameter changed (default: redraw everything)."""
        self.draw()

    def draw(self) -> None:
        raise NotImplementedError

    def downloads(self, figure_fn: Callable[[], Any] | None, data_fn: Callable[[], Any],
                  stem_fn: Callable[[], str], *, netcdf: bool = False) -> pn.Row:
        """The "download figure" / "download data" row, computed on click: ``figure_fn()`` is a
        matplotlib figure of :mod:`wpeft.viz` (saved as a 200-dpi PNG or as SVG: two buttons;
        None: no figure buttons) and ``data_fn()`` a DataFrame (CSV) or an xarray object
        (netCDF); files are named ``stem_fn()`` plus the suffix (``netcdf``: the data button
        says netCDF, not CSV)."""
        data_label, suffix = ("data (netCDF)", "nc") if netcdf else ("data (CSV)", "csv")
        self.download_data = pn.widgets.FileDownload(
            callback=lambda: self._download(self.download_data, data_fn, stem_fn),
            filename=f"{self.key}.{suffix}", label=f"Download {data_label}",
            color="light", css_classes=["wb-download-data"], width=210)
        buttons = [self.download_data]
        self.download_figure = self.download_svg = None
        if figure_fn is not None:
            self.download_figure = pn.widgets.FileDownload(
                callback=lambda: self._download(self.download_figure, figure_fn, stem_fn),
                filename=f"{self.key}.png", label="Download figure (PNG)", color="light",
                css_classes=["wb-download-figure"], width=210)
            self.download_svg = pn.widgets.FileDownload(
                callback=lambda: self._download(self.download_svg, figure_fn, stem_fn, "svg"),
                filename=f"{self.key}.svg", label="SVG", color="light",
                css_classes=["wb-download-svg"], width=70)
            buttons[:0] = [self.download_figure, self.download_svg]
        return pn.Row(*buttons, css_classes=["wb-downloads"])

    def _download(self, button: pn.widgets.FileDownload, fn: Callable[[], Any],
                  stem_fn: Callable[[], str], image: str = "png") -> io.BytesIO:
        """Bytes of one download (the button's file name set to match; a figure as ``image``,
        ``png`` or ``svg``); a failure is shown in the view's message line and raised."""
        try:
            payload, suffix = file_bytes(fn(), image)
        except Exception as exc:  # shown in the page, then raised for the log
            self.show_download_error(exc)
            raise
        button.filename = f"{_file_stem(stem_fn())}.{suffix}"
        return io.BytesIO(payload)

    def show_download_error(self, exc: BaseException) -> None:
        text = (self.cat.sanitize(str(exc)) if isinstance(exc, WpeftError)
                else f"The download failed ({type(exc).__name__}); the server log has details.")
        self.message.object = alert_html(f"Download: {text}")
        self.message.visible = True


#: Cells of a colour mesh above which an SVG download embeds it as an image (at 200 dpi):
#: a global 0.25° field as vector quads would be a million SVG paths.
SVG_MESH_CELLS = 20_000


def file_bytes(obj: Any, image: str = "png") -> tuple[bytes, str]:
    """What a download holds: a matplotlib figure as a 200-dpi PNG or as SVG (``image``;
    text and lines as vectors, a colour mesh of more than :data:`SVG_MESH_CELLS` cells as an
    embedded 200-dpi image), a DataFrame as CSV (no index), an xarray Dataset / DataArray as
    netCDF; returns ``(bytes, suffix)``."""
    import xarray as xr
    from matplotlib.collections import QuadMesh
    from matplotlib.figure import Figure

    if image not in ("png", "svg"):
        raise ValueError(f"image must be 'png' or 'svg', got {image!r}.")
    if isinstance(obj, Figure):
        if image == "svg":
            for mesh in obj.findobj(QuadMesh):
                mesh.set_rasterized(mesh.get_array().size > SVG_MESH_CELLS)
        buf = io.BytesIO()
        obj.savefig(buf, format=image, dpi=200, bbox_inches="tight")
        return buf.getvalue(), image
    if isinstance(obj, pd.DataFrame):
        return obj.to_csv(index=False).encode("utf-8"), "csv"
    if isinstance(obj, xr.DataArray):
        obj = obj.to_dataset(name=obj.name or "value")
    if isinstance(obj, xr.Dataset):
        return bytes(obj.to_netcdf()), "nc"
    raise TypeError(f"cannot download a {type(obj).__name__}")


def _file_stem(text: str) -> str:
    """A file name from run names and choices: letters, digits, '.', '-' and '_' only."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text).strip("._") or "wpeft"


def join_names(names: Sequence[str]) -> str:
    """Run names as one ``Selection.runs`` value: comma-separated, a ``,`` (and ``%``) inside a
    name percent-escaped, so any run name round-trips through :func:`split_names`."""
    return ",".join(n.replace("%", "%25").replace(",", "%2C") for n in names)


def split_names(value: Any) -> list[str]:
    """``"a, b,a"`` -> ``["a", "b"]``: the run names of ``Selection.runs`` (see
    :func:`join_names`), repeats dropped."""
    names = (unquote(n.strip()) for n in _text(value).split(",") if n.strip())
    return list(dict.fromkeys(names))



#: Widgets being updated from the selection (their change must not be copied back to it).
_UPDATING: set[int] = set()


def _bind(widget: pn.widgets.Widget, sel: Selection, name: str,
          to_sel: Callable[[Any], Any] = lambda v: v) -> None:
    """Copy a widget's value into ``sel.<name>`` whenever the user changes it."""
    def copy(event: param.parameterized.Event) -> None:
        if id(widget) not in _UPDATING:
            setattr(sel, name, to_sel(event.new))

    widget.param.watch(copy, "value")


def _set(widget: pn.widgets.Widget, **values: Any) -> None:
    """Update options and value of a widget in one go (no intermediate invalid value), without
    writing the value back to the selection (which may hold a refused URL value)."""
    changed = {k: v for k, v in values.items() if getattr(widget, k) != v}
    if changed:
        _UPDATING.add(id(widget))
        try:
            widget.param.update(**changed)
        finally:
            _UPDATING.discard(id(widget))


#: Rows per page of the runs table (the browser lays out one page at a time).
OVERVIEW_PAGE_SIZE = 20


def column_widths(df: pd.DataFrame, *, char_px: int = 8, pad_px: int = 24,
                  least: int = 60, most: int = 320) -> dict[str, int]:
    """Pixel width of each column of ``df`` from its longest text (title or value, as
    ``str``): ``char_px`` per character plus ``pad_px`` (sort arrow, padding), clamped to
    [``least``, ``most``]."""
    out = {}
    for column in df.columns:
        longest = max([len(str(column)), *(len(str(v)) for v in df[column])])
        out[str(column)] = int(min(most, max(least, char_px * longest + pad_px)))
    return out


def headline_scores(scores: Sequence[str], tasks: Iterable[str]) -> list[str]:
    """The score columns (``metric/variable``) whose variable is a headline variable of one of
    the built-in ``tasks`` (:data:`wpeft.data.headline.BUILTIN_HEADLINES`: read without importing
    the tasks, which would load torch into the server), in the given order; all of them when no
    such task is among them."""
    from wpeft.data.headline import BUILTIN_HEADLINES
    from wpeft.runs.curves import is_headline

    headlines = [BUILTIN_HEADLINES[t] for t in tasks if t in BUILTIN_HEADLINES]
    if not headlines:
        return list(scores)
    return [c for c in scores if any(is_headline(c.partition("/")[2], h) for h in headlines)]


class OverviewView(View):
    key = "overview"
    watches = ("columns",)

    def __init__(self, wb: Workbench) -> None:
        super().__init__(wb)
        # A column is three bokeh models in every session's page (its definition, formatter and
        # editor): the headline scores by default keep a first page light; every score is in
        # the download
        self.columns = pn.widgets.MultiChoice(
            label="Score columns (default: the tasks' headline variables; all in the download)",
            options=[], value=[], css_classes=["wb-columns"], sizing_mode="stretch_width")
        _bind(self.columns, self.sel, "columns", join_names)
        self.table = pn.widgets.Tabulator(
            pd.DataFrame(), disabled=True, selectable=1, show_index=False, frozen_columns=["run"],
            sizing_mode="stretch_width", height=420, layout="fit_data_table",
            pagination="local", page_size=OVERVIEW_PAGE_SIZE, css_classes=["wb-runs-table"],
        )
        self.table.param.watch(self._row_selected, "selection")
        self.content.objects = [self.columns, self.table]
        self.content.append(self.downloads(None, self.frame, lambda: f"runs-{self.cat.root.name}"))

    def frame(self):
        """The runs table as shown: identity, counts, the three sizes (``k_%`` and
        ``changed_%`` of the backbone, ``adapter_MB`` and ``adapter_%`` of the full checkpoint),
        budget in percent, then every score."""
        df = self.cat.table()
        if df.empty:
            return df
        df = df.copy()
        df["budget"] = 100.0 * df["budget"]
        for key, (column, scale) in _SIZE_COLUMNS.items():
            values = df.pop(key) if key in df.columns else pd.Series(float("nan"), df.index)
            df[column] = scale * pd.to_numeric(values, errors="coerce")
        df = df.rename(columns={"budget": "budget_%"})
        if "problem" in df.columns and df["problem"].isna().all():
            df = df.drop(columns="problem")  # shown only when a run has one
        sizes = [column for column, _ in _SIZE_COLUMNS.values()]
        first = ["run", "problem", "task", "method", "budget_%", "seed", "finished", "steps",
                 *sizes, "trainable_backbone", "changed_backbone", "trainable_total",
                 "changed_total", "encoder_decoder_policy", "train_seconds"]
        first = [c for c in first if c in df.columns]
        return df[first + [c for c in df.columns if c not in first]]

    def draw(self) -> None:
        full = self.frame()
        if full.empty:
            raise RunNameError("No run is selected.", "", "empty")  # shown as "no runs yet"
        scores = [c for c in full.columns if c not in _RUN_COLUMNS and c not in _SHOWN_SIZES]
        asked = [c for c in split_names(self.sel.columns) if c in scores]
        chosen = asked or headline_scores(scores, full["task"].dropna().unique()) or scores
        _set(self.columns, options=scores, value=chosen)
        df = full[[c for c in full.columns if c not in scores or c in chosen]]
        if not df.equals(self.table.value):
            # column widths given, so the browser does not measure every cell to fit them
            self.table.param.update(value=df, widths=column_widths(df))
        done = int(df["finished"].sum())
        bad = int(df["problem"].notna().sum()) if "problem" in df.columns else 0
        problems = (
            f" **{bad} {'run has a problem' if bad == 1 else 'runs have problems'}** with "
            "their files (see *problem*); the rest reads as usual." if bad else ""
        )
        self.caption.object = (
            f"**{len(df)} runs** ({done} finished, {len(df) - done} training or interrupted) in "
            f"`{_md(self.cat.root.name)}`.{problems} Click a column title to sort, a row to "
            "select that run."
        )

    def _row_selected(self, event: param.parameterized.Event) -> None:
        if self._drawing or not event.new:
            return
        row = event.new[0]
        if 0 <= row < len(self.table.value):
            self.sel.run = str(self.table.value["run"].iloc[row])


def _drawn(data: Any) -> Any:
    """What a view drew last, for its downloads (DataError before it drew anything)."""
    if data is None:
        raise DataError("This view shows nothing yet: choose a run that it can draw first.")
    return data


class FisherView(View):
    key = "fisher"
    watches = ("record", "tensor", "step", "matrix", "blocks")

    def __init__(self, wb: Workbench) -> None:
        super().__init__(wb)
        from wpeft.viz.fisher import MASK_VARIABLES

        self.record = pn.widgets.Select(
            label="Record", options={label: key for key, label in MASK_VARIABLES.items()},
            css_classes=["wb-record"], width=280)
        self.tensor = pn.widgets.Select(label="Tensor kind", options={"all kinds": ""},
                                        css_classes=["wb-tensor"], width=160)
        self.step = pn.widgets.DiscretePlayer(
            label="Training step", options=[0], value=0, interval=700, loop_policy="once",
            show_loop_controls=False, css_classes=["wb-step"], width=420,
            visible_buttons=["first", "previous", "pause", "play", "next", "last"])
        self.matrix = pn.widgets.Select(label="Weight matrix", options=[""],
                                        css_classes=["wb-matrix"], width=220)
        self.blocks = pn.widgets.MultiChoice(
            label="Blocks in the overlap curves (none: mean over blocks)", options=[],
            css_classes=["wb-blocks"], width=420)
        _bind(self.record, self.sel, "record")
        _bind(self.tensor, self.sel, "tensor")
        _bind(self.step, self.sel, "step")
        _bind(self.matrix, self.sel, "matrix")
        _bind(self.blocks, self.sel, "blocks", lambda v: ",".join(v))
        self.heatmap = _plot_pane("wb-fisher-heatmap")
        # a pre-rendered PNG (cached for all sessions): the step player swaps one image
        self.image = pn.pane.PNG(None, css_classes=["wb-plot", "wb-mask-image"], width=384,
                                 height=336, fixed_aspect=True)
        # the overlap curves pre-rendered too (two small line panels: an image draws in a
        # fraction of the browser time of two more bokeh figures)
        self.curves = pn.pane.PNG(None, css_classes=["wb-plot", "wb-overlap-curves"],
                                  width=520, height=400, fixed_aspect=True)
        self.content.objects = [
            pn.Row(self.record, self.tensor),
            self.heatmap,
            pn.Row(pn.Column(self.step, self.matrix), self.image, sizing_mode="stretch_width"),
            self.blocks,
            self.curves,
        ]
        self._data: tuple[RunEntry, Any] | None = None
        self._steps: list[int] | None = None
        self.content.append(self.downloads(self._figure, lambda: _drawn(self._data)[1],
                                           self._stem, netcdf=True))

    def _load(self) -> tuple[RunEntry, Any]:
        entry = self.wb.run_a()
        ds = self.cat.fisher(entry.name)
        if ds is None:
            raise DataError(
                f"Run {entry.name!r} ({entry.method}) has no Fisher-mask records: only the "
                f"selection methods ({_SELECTION_METHODS}) record them"
                + (", and this run has not written its first record yet." if not entry.finished
                   else ".")
            )
        return entry, ds

    def draw(self) -> None:
        self._data = None  # a failed load must not leave the previous run's records behind
        self._data = self._load()
        ds = self._data[1]
        steps = [int(s) for s in ds["step"].values]
        tensors = [str(t) for t in ds["tensor"].values]
        blocks = [str(b) for b in ds["block"].values]
        matrices = [str(m) for m in ds["matrix"].values] if "matrix" in ds.dims else []
        record = _pick(self.sel.record, list(self.record.options.values()))
        tensor = _pick(self.sel.tensor, [""] + tensors)
        # at the last step while new records arrive: follow them
        old = self._steps
        following = self.sel.step is None or (
            bool(old) and _as_int(self.sel.step) == old[-1] and steps != old)
        step = steps[-1] if following else _pick(_as_int(self.sel.step), steps, steps[-1])
        self._steps = steps
        matrix = _pick(self.sel.matrix, matrices) if matrices else ""
        chosen = [b for b in _text(self.sel.blocks).split(",") if b in blocks]
        _set(self.record, value=record)
        _set(self.tensor, options={"all kinds": "", **{t: t for t in tensors}}, value=tensor)
        _set(self.step, options=steps, value=step)
        _set(self.matrix, options=matrices or [""], value=matrix)
        _set(self.blocks, options=blocks, value=chosen)
        self.sel.param.update(record=record, tensor=tensor, step=step, matrix=matrix,
                              blocks=",".join(chosen))
        self._draw_heatmap()
        self._draw_image()
        self._draw_curves()

    def on_selection(self, names: set[str]) -> None:
        if self._data is None:
            return self.draw()
        if "record" in names or "tensor" in names:
            self.sel.record = _pick(self.sel.record, list(self.record.options.values()))
            self.sel.tensor = _pick(self.sel.tensor, list(self.tensor.options.values()))
            _set(self.record, value=self.sel.record)
            _set(self.tensor, value=self.sel.tensor)
            self._draw_heatmap()
            self._draw_curves()
        if "step" in names or "matrix" in names:
            self.sel.step = _pick(_as_int(self.sel.step), list(self.step.options),
                                  self.step.options[-1])
            self.sel.matrix = _pick(self.sel.matrix, list(self.matrix.options))
            _set(self.step, value=self.sel.step)
            _set(self.matrix, value=self.sel.matrix)
            self._draw_image()
        if "blocks" in names:
            chosen = [b for b in _text(self.sel.blocks).split(",") if b in self.blocks.options]
            _set(self.blocks, value=chosen)
            self._draw_curves()

    def _caption(self) -> None:
        entry, ds = self._data  # type: ignore[misc]
        steps = list(self.step.options)
        k = ds.attrs.get("k")
        size = f", k = {int(k):,} entries selected" if k is not None else ""
        self.caption.object = (
            f"**{_md(entry.name)}** · {_md(entry.method)}{size} · {len(steps)} recorded steps "
            f"({steps[0]}–{steps[-1]}) · mask image at **step {self.sel.step}** of "
            f"**{_md(self.sel.matrix or 'no matrix')}**"
            + ("" if entry.finished else " · *training: updates as records arrive*")
        )

    def _draw_heatmap(self) -> None:
        from wpeft.viz.interactive import hv_mask_heatmap

        _, ds = self._data  # type: ignore[misc]
        self.heatmap.object = hv_mask_heatmap(ds, self.sel.record, self.sel.tensor or None)

    def _draw_image(self) -> None:
        from wpeft.viz.fisher import mask_image_png, mask_image_title

        entry, ds = self._data  # type: ignore[misc]
        if "mask_image" in ds and self.sel.matrix:
            matrix, step = _text(self.sel.matrix), int(self.sel.step)
            theme = self.wb.theme
            png = self.cat.record_png(
                entry.name, "fisher", ("mask_image", matrix, step, theme),
                lambda records: mask_image_png(records, matrix, step, theme=theme))
            self.image.param.update(object=png, alt_text=mask_image_title(matrix, step),
                                    visible=True)
        else:
            self.image.visible = False
        self._caption()

    def _draw_curves(self) -> None:
        from wpeft.viz.fisher import overlap_curves_png, overlap_curves_title

        entry, _ = self._data  # type: ignore[misc]
        blocks = tuple(b for b in _text(self.sel.blocks).split(",") if b)
        tensor = _text(self.sel.tensor) or None
        theme = self.wb.theme
        png = self.cat.record_png(entry.name, "fisher", ("overlap", blocks, tensor, theme),
                                  lambda records: overlap_curves_png(records, blocks or None,
                                                                     tensor, theme=theme))
        self.curves.param.update(object=png, alt_text=overlap_curves_title(tensor))

    def _figure(self) -> Any:
        """The heatmap as shown (record, tensor kind), static."""
        from wpeft.viz.fisher import plot_mask_heatmap

        _, ds = _drawn(self._data)
        return plot_mask_heatmap(ds, self.sel.record, self.sel.tensor or None)

    def _stem(self) -> str:
        return f"fisher-{self.sel.run}-{self.sel.record}-{self.sel.tensor or 'all'}"


class AttentionView(View):
    key = "attention"
    watches = ("block", "prompt", "att_step")

    def __init__(self, wb: Workbench) -> None:
        super().__init__(wb)
        self.block = pn.widgets.Select(label="Block", options=[""], css_classes=["wb-block"],
                                       width=180)
        self.prompt = pn.widgets.Select(label="Prompt token", options=[0],
                                        css_classes=["wb-prompt"], width=140)
        self.att_step = pn.widgets.Select(label="Record step", options=[0],
                                          css_classes=["wb-att-step"], width=140)
        _bind(self.block, self.sel, "block")
        _bind(self.prompt, self.sel, "prompt")
        _bind(self.att_step, self.sel, "att_step")
        # the two kernels pre-rendered (cached for all sessions, as the Fisher view's images):
        # a bokeh heatmap costs the server ~0.1 s of models per session and the browser more;
        # the prompt map, which follows the prompt token, stays interactive
        self.var_var = pn.pane.PNG(None, css_classes=["wb-plot", "wb-var-var"])
        self.var_patch = pn.pane.PNG(None, css_classes=["wb-plot", "wb-var-patch"])
        self.prompt_map = _plot_pane("wb-prompt-map")
        self.content.objects = [
            pn.Row(self.block, self.att_step, self.prompt),
            pn.Row(self.var_var, self.prompt_map, sizing_mode="stretch_width"),
            self.var_patch,
        ]
        self._data: tuple[RunEntry, Any] | None = None
        self.content.append(self.downloads(self._figure, lambda: _drawn(self._data)[1],
                                           self._stem, netcdf=True))

    def draw(self) -> None:
        self._data = None
        entry = self.wb.run_a()
        ds = self.cat.attention(entry.name)
        if ds is None:
            raise DataError(
                f"Run {entry.name!r} ({entry.method}) has no prompt-attention records: only "
                "methods with TADP prompts (weatherpeft, tadp) record them, at the end of "
                "training" + (" (this run is still training)." if not entry.finished else ".")
            )
        self._data = (entry, ds)
        blocks = [str(b) for b in ds["block"].values]
        prompts = [int(p) for p in ds["prompt"].values]
        steps = [int(s) for s in ds["step"].values] if "step" in ds.dims else []
        block = _pick(self.sel.block, blocks)
        prompt = _pick(_as_int(self.sel.prompt), prompts)
        step = _pick(_as_int(self.sel.att_step), steps, steps[-1]) if steps else None
        _set(self.block, options=blocks, value=block)
        _set(self.prompt, options=prompts, value=prompt)
        _set(self.att_step, options=steps or [0], value=step if steps else 0)
        self.att_step.visible = bool(steps)
        self.sel.param.update(block=block, prompt=prompt, att_step=step)
        self._draw(prompt_only=False)

    def on_selection(self, names: set[str]) -> None:
        if self._data is None:
            return self.draw()
        self.sel.block = _pick(self.sel.block, list(self.block.options))
        self.sel.prompt = _pick(_as_int(self.sel.prompt), list(self.prompt.options))
        if self.att_step.visible:
            self.sel.att_step = _pick(_as_int(self.sel.att_step), list(self.att_step.options),
                                      self.att_step.options[-1])
        _set(self.block, value=self.sel.block)
        _set(self.prompt, value=self.sel.prompt)
        if self.att_step.visible:
            _set(self.att_step, value=self.sel.att_step)
        self._draw(prompt_only=names == {"prompt"})

    def _draw(self, prompt_only: bool) -> None:
        from wpeft.viz.attention import (
            patch_attention_title,
            plot_patch_attention,
            plot_variable_attention,
            variable_attention_title,
        )
        from wpeft.viz.interactive import hv_prompt_map
        from wpeft.viz.style import themed_png

        entry, ds = self._data  # type: ignore[misc]
        block = self.sel.block
        step = _as_int(self.sel.att_step) if self.att_step.visible else None
        if not prompt_only:
            theme = self.wb.theme
            for pane, plot, title, what in (
                (self.var_var, plot_variable_attention, variable_attention_title, "var_var"),
                (self.var_patch, plot_patch_attention, patch_attention_title, "var_patch"),
            ):
                png = self.cat.record_png(
                    entry.name, "attention", (what, block, step, theme),
                    lambda records, plot=plot: themed_png(
                        lambda: plot(records, block, step=step), theme=theme))
                pane.param.update(object=png, alt_text=title(ds, block, step=step))
        self.prompt_map.object = hv_prompt_map(ds, block, self.sel.prompt, earth=entry.earth,
                                               step=step)
        when = f" · record step **{step}**" if step is not None else ""
        self.caption.object = (
            f"**{_md(entry.name)}** · {_md(entry.method)} · block **{_md(block)}**{when} · "
            "prompt token "
            f"**{self.sel.prompt}** of {len(self.prompt.options)}"
        )

    def _figure(self) -> Any:
        """The variable x variable attention of the shown block and step, static."""
        from wpeft.viz.attention import plot_variable_attention

        _, ds = _drawn(self._data)
        step = _as_int(self.sel.att_step) if self.att_step.visible else None
        return plot_variable_attention(ds, self.sel.block, step=step)

    def _stem(self) -> str:
        return f"attention-{self.sel.run}-{self.sel.block}"


def _skill_named(da: Any, variable: str, metric: str) -> Any:
    """``da`` named ``<variable>_<metric>`` without its attributes, so the colour bar reads
    e.g. "RMSE of 2 metre temperature (K)" from the schema."""
    out = da.copy()
    out.attrs = {}
    return out.rename(f"{variable}_{metric}")


class SkillView(View):
    key = "skill"
    watches = ("variable", "level", "metric")

    def __init__(self, wb: Workbench) -> None:
        super().__init__(wb)
        self.variable = pn.widgets.Select(label="Variable", options=[""],
                                          css_classes=["wb-variable"], width=260)
        self.level = pn.widgets.Select(label="Level (hPa) / lead", options=[""],
                                       css_classes=["wb-level"], width=150)
        self.metric = pn.widgets.Select(label="Metric", options={"RMSE": "rmse"},
                                        css_classes=["wb-metric"], width=180)
        _bind(self.variable, self.sel, "variable")
        _bind(self.level, self.sel, "level")
        _bind(self.metric, self.sel, "metric")
        self.maps = _plot_pane("wb-skill-maps")
        self.content.objects = [pn.Row(self.variable, self.level, self.metric),
                                pn.Column(self.maps, scroll=True, sizing_mode="stretch_width")]
        self._export: tuple[Callable[[], Any], Any] | None = None  # (static figure, data)
        self.content.append(self.downloads(lambda: _drawn(self._export)[0](),
                                           lambda: _drawn(self._export)[1], self._stem,
                                           netcdf=True))

    def on_selection(self, names: set[str]) -> None:
        self.draw()

    def draw(self) -> None:
        from wpeft.viz.interactive import hv_skill_comparison, hv_skill_map

        self._export = None
        a = self.wb.run_a()
        b = self.wb.run_b()
        flat = self.cat.skill_variables(a.name)
        metrics = self.cat.skill_metrics(a.name)
        if b is not None:
            shared = set(self.cat.skill_metrics(b.name))
            metrics = [m for m in metrics if m in shared]
        grouped: dict[str, list[str]] = {}
        for name in flat:
            base, qualifier = split_variable(name)
            grouped.setdefault(base, []).append(qualifier)
        variable = _pick(self.sel.variable, list(grouped))
        qualifiers = grouped[variable]
        level = _pick(self.sel.level, qualifiers)
        metric = _pick(self.sel.metric, metrics)
        _set(self.variable, options=list(grouped), value=variable)
        _set(self.level, options=qualifiers, value=level)
        self.level.visible = qualifiers != [""]
        _set(self.metric, options={METRIC_LABELS.get(m, m): m for m in metrics}, value=metric)
        self.sel.param.update(variable=variable, level=level, metric=metric)
        name = f"{variable}_{level}" if level else variable
        label = METRIC_LABELS.get(metric, metric)
        if b is None:
            field = _skill_named(self.cat.skill_map(a.name, name, metric), name, metric)
            self.maps.object = hv_skill_map(field, earth=a.earth,
                                            title=f"{a.name}: {label} of {name}")
            self._export = (self._static(field, None, None, a, None,
                                         f"{a.name}: {label} of {name}"), field)
            self.caption.object = (
                f"**{_md(a.name)}** ({_md(a.method)}) · {label} of **{_md(name)}** over the "
                "test period. "
                "Choose run B in the sidebar to compare two runs."
            )
            return
        diff = self.cat.skill_difference(a.name, b.name, metric)
        if name not in diff["variable"].values:
            raise DataError(f"Runs {a.name!r} and {b.name!r} do not share {name!r}.")
        d = diff.sel(variable=name)
        self.maps.object = hv_skill_comparison(
            _skill_named(d["metric_a"], name, metric), _skill_named(d["metric_b"], name, metric),
            d, labels=(a.name, b.name), earth=a.earth).cols(2)  # A | B, then A − B
        self._export = (self._static(_skill_named(d["metric_a"], name, metric),
                                     _skill_named(d["metric_b"], name, metric), d, a, b,
                                     f"{label} of {name}"), d)
        share = float(d["significant"].mean())
        n_eff = f", median n_eff {float(d['n_eff'].median()):.1f}" if "n_eff" in d else ""
        self.caption.object = (
            f"{label} of **{_md(name)}**: **{_md(a.name)}** ({_md(a.method)}) vs "
            f"**{_md(b.name)}** ({_md(b.method)}) and "
            f"A − B ({d['difference'].attrs.get('description', 'negative: A better')}; "
            f"dots: not significant at p < {diff.attrs['alpha']}, "
            f"{diff.attrs['test_name']} over {diff.attrs['n_time']} test times"
            f"{n_eff}; {100 * share:.0f}% of points significant)"
        )

    @staticmethod
    def _static(field: Any, field_b: Any, diff: Any, a: RunEntry, b: RunEntry | None,
                title: str) -> Callable[[], Any]:
        """The matplotlib counterpart of what is shown (drawn on click)."""
        from wpeft.viz.skill import plot_skill_comparison, plot_skill_map

        if b is None:
            return lambda: plot_skill_map(field, earth=a.earth, title=title)
        return lambda: plot_skill_comparison(field, field_b, diff, labels=(a.name, b.name),
                                             earth=a.earth, title=title)

    def _stem(self) -> str:
        level = f"_{self.sel.level}" if self.sel.level else ""
        runs = f"{self.sel.run}-vs-{self.sel.run_b}" if self.sel.run_b else f"{self.sel.run}"
        return f"skill-{runs}-{self.sel.variable}{level}-{self.sel.metric}"


class BudgetView(View):
    key = "budget"
    watches = ("task", "score", "size")

    def __init__(self, wb: Workbench) -> None:
        super().__init__(wb)
        self.task = pn.widgets.Select(label="Task", options=[""], css_classes=["wb-task"],
                                      width=200)
        self.score = pn.widgets.Select(label="Score", options=[""], css_classes=["wb-score"],
                                       width=320)
        self.size = pn.widgets.Select(label="x: size", options=_SIZE_CHOICES,
                                      value="budget_fraction", css_classes=["wb-size"], width=200)
        _bind(self.task, self.sel, "task")
        _bind(self.score, self.sel, "score")
        _bind(self.size, self.sel, "size")
        self.plot = _plot_pane("wb-budget-plot")
        self.content.objects = [pn.Row(self.task, self.score, self.size), self.plot]
        self._frame: pd.DataFrame | None = None
        self.content.append(self.downloads(self._figure, lambda: _drawn(self._frame),
                                           lambda: f"budget-{self.sel.task}-{self.sel.score}"))

    def on_selection(self, names: set[str]) -> None:
        self.draw()

    def draw(self) -> None:
        from wpeft.viz.interactive import hv_budget_vs_skill
        from wpeft.viz.skill import SIZE_AXES

        df = self.cat.table()
        if df.empty:
            raise RunNameError("No run is selected.", "", "empty")
        finished = df[df["finished"].astype(bool)]
        if finished.empty:
            raise DataError("No run has finished yet; budget vs skill needs final scores.")
        self._frame = None
        chosen = [e.name for e in self.wb.chosen_runs()]
        if chosen:  # the runs compared in the sidebar only
            finished = finished[finished["run"].isin(chosen)]
            if finished.empty:
                raise DataError("None of the runs chosen under 'Compare runs' has finished; "
                                "budget vs skill needs final scores (clear the choice to see "
                                "every finished run).")
        tasks = sorted(map(str, finished["task"].unique()))
        task = _pick(self.sel.task or self.wb.default_task(), tasks)
        rows = finished[finished["task"] == task]
        scores = [c for c in rows.columns
                  if c not in _RUN_COLUMNS and rows[c].notna().any()]
        preferred = [c for c in scores if "bilinear" not in c and "persistence" not in c]
        score = _pick(self.sel.score, scores, (preferred or scores or [""])[0])
        size = _pick(self.sel.size, list(_SIZE_CHOICES.values()))
        _set(self.task, options=tasks, value=task)
        _set(self.score, options=scores or [""], value=score)
        _set(self.size, value=size)
        self.sel.param.update(task=task, score=score, size=size)
        frame = self.cat.budget_table(task, score, size)
        if chosen:
            frame = frame[frame["run"].isin(chosen)].reset_index(drop=True)
        if frame.empty:
            which = next(k for k, v in _SIZE_CHOICES.items() if v == size)
            raise DataError(
                f"No finished {task} run has a {score!r} score and a known size {which!r} "
                "(runs written before it was recorded lack it); choose another x axis."
            )
        self.plot.object = hv_budget_vs_skill(frame, score=score, size=size,
                                              title=f"{task}: budget vs {score}")
        self._frame = frame
        self.caption.object = (
            f"**{len(frame)} finished {_md(task)} runs** · x: {SIZE_AXES[size]} (log scale) · "
            f"y: **{_md(score)}** · line: mean over seeds per budget"
            + (" · the runs chosen under *Compare runs*" if chosen else "")
        )

    def _figure(self) -> Any:
        """The plot as shown (task, score, x size), static."""
        from wpeft.viz.skill import SIZE_AXES, plot_budget_vs_skill

        frame = _drawn(self._frame)
        size = self.sel.size
        fig = plot_budget_vs_skill(frame.assign(budget_fraction=frame[size]),
                                   score=self.sel.score,
                                   title=f"{self.sel.task}: budget vs {self.sel.score}")
        fig.axes[0].set_xlabel(SIZE_AXES[size])
        return fig


def _smoothing(value: Any) -> float:
    """An EMA weight from the selection: a number in [0, 0.99], else 0 (raw lines)."""
    try:
        weight = float(value)
    except (TypeError, ValueError):
        return 0.0
    return weight if 0.0 <= weight <= 0.99 else 0.0


class CurvesView(View):
    """Training loss and validation scores against step for the compared runs (run A alone
    when none is chosen), redrawn while a run trains (its ``metrics.jsonl`` is polled)."""

    key = "curves"
    watches = ("curve", "logy", "smoothing")

    def __init__(self, wb: Workbench) -> None:
        super().__init__(wb)
        self.curve = pn.widgets.Select(label="Curve", options={"training loss": "train:loss"},
                                       css_classes=["wb-curve"], width=320)
        self.logy = pn.widgets.RadioButtonGroup(options={"linear y": False, "log y": True},
                                                value=False, css_classes=["wb-logy"])
        self.smoothing = pn.widgets.FloatSlider(
            label="Smoothing (EMA weight)", start=0.0, end=0.99, step=0.01, value=0.0,
            css_classes=["wb-smoothing"], width=240)
        _bind(self.curve, self.sel, "curve")
        _bind(self.logy, self.sel, "logy")
        _bind(self.smoothing, self.sel, "smoothing")
        self.plot = _plot_pane("wb-curves-plot")
        self.content.objects = [pn.Row(self.curve, self.logy, self.smoothing), self.plot]
        self._frame: pd.DataFrame | None = None
        self.content.append(self.downloads(self._figure, lambda: _drawn(self._frame),
                                           self._stem))

    def entries(self) -> list[RunEntry]:
        """The compared runs, else run A."""
        return self.wb.chosen_runs() or [self.wb.run_a()]

    def draw(self) -> None:
        from wpeft.viz.curves import curve_label
        from wpeft.viz.interactive import hv_curves

        self._frame = None
        entries = self.entries()
        frame = self.cat.curves([e.name for e in entries])
        if frame.empty:
            names = ", ".join(e.name for e in entries)
            raise DataError(
                f"{names}: no training or validation lines in {METRICS} yet; train with "
                "--log-every N (training loss) and --eval-every N (validation scores)."
            )
        pairs = dict.fromkeys(zip(frame["split"], frame["column"]))
        ordered = sorted(pairs, key=lambda p: (p != ("train", "loss"), p[0] != "train"))
        options = {curve_label(c, s): f"{s}:{c}" for s, c in ordered}
        curve = _pick(self.sel.curve, list(options.values()))
        logy = self.sel.logy is True
        smoothing = _smoothing(self.sel.smoothing)
        _set(self.curve, options=options, value=curve)
        _set(self.logy, value=logy)
        _set(self.smoothing, value=smoothing)
        self.sel.param.update(curve=curve, logy=logy, smoothing=smoothing)
        split, column = curve.split(":", 1)
        self.plot.object = hv_curves(frame, column, split=split, logy=logy, smoothing=smoothing,
                                     title=curve_label(column, split))
        self._frame = frame
        shown = set(frame.loc[(frame["split"] == split) & (frame["column"] == column), "run"])
        missing = [e.name for e in entries if e.name not in shown]
        training = [e.name for e in entries if not e.finished]
        self.caption.object = (
            f"**{len(shown)} run{'s' * (len(shown) != 1)}** · **{_md(curve_label(column, split))}"
            f"** against the optimiser step · {'log' if logy else 'linear'} y · "
            + (f"smoothing: EMA weight {smoothing:g} applied to the plotted lines (the data "
               "download holds the raw values)" if smoothing else "no smoothing")
            + (f" · no such lines: {_md(', '.join(missing))}" if missing else "")
            + (" · *training: updates as lines arrive*" if training else "")
            + ". Choose runs under *Compare runs* in the sidebar to overlay them."
        )
        problems = frame.attrs.get("problems", [])
        if problems:
            self.message.object = alert_html(
                "Some lines could not be read; the curves show the others: "
                + "; ".join(self.cat.sanitize(p) for p in problems) + ".", "info")
            self.message.visible = True

    def _figure(self) -> Any:
        from wpeft.viz.curves import plot_training_curves

        split, column = _text(self.sel.curve).split(":", 1)
        return plot_training_curves(_drawn(self._frame), column, split=split,
                                    log_y=self.sel.logy is True,
                                    smoothing=_smoothing(self.sel.smoothing))

    def _stem(self) -> str:
        names = "+".join(e.name for e in self.entries())
        return f"curves-{names}-{self.sel.curve}"


class ScorecardView(View):
    """The compared runs' test scores against a reference run, WeatherBench-X style."""

    key = "scorecard"
    watches = ("reference",)

    def __init__(self, wb: Workbench) -> None:
        super().__init__(wb)
        self.reference = pn.widgets.Select(label="Reference run", options=[""],
                                           css_classes=["wb-reference"], width=360)
        _bind(self.reference, self.sel, "reference")
        self.plot = _plot_pane("wb-scorecard-plot")
        self.content.objects = [self.reference, self.plot]
        self._card: Any = None
        self.content.append(self.downloads(self._figure, self._table,
                                           lambda: f"scorecard-{self.sel.reference}"))

    def entries(self) -> list[RunEntry]:
        """The compared runs, else every finished run of run A's task."""
        chosen = self.wb.chosen_runs()
        if chosen:
            return chosen
        return self.cat.task_runs(self.wb.run_a().name)

    def draw(self) -> None:
        from wpeft.runs.scorecard import SCORECARD_BINS
        from wpeft.viz.interactive import hv_scorecard

        self._card = None
        entries = self.entries()
        if not entries:
            raise DataError("No finished run to put on a scorecard yet.")
        names = [e.name for e in entries]
        a = _text(self.sel.run)
        finished = {e.name for e in self.cat.runs() if e.finished}
        options = names + ([a] if a in finished and a not in names else [])
        reference = _pick(self.sel.reference, options, self.cat.default_reference(options, a))
        _set(self.reference, options=options, value=reference)
        self.sel.reference = reference
        card = self.cat.scorecard(names, reference)
        self.plot.object = hv_scorecard(card, title=f"{card.attrs['task']} scorecard against "
                                                    f"{reference}")
        self._card = card
        bins = ", ".join(f"{b:g}" for b in card.attrs.get("bins", SCORECARD_BINS))
        self.caption.object = (
            f"**{card.sizes['run']} runs** x {card.sizes['score']} test scores against "
            f"**{_md(reference)}** (top row) · cell: the run's score · colour: its difference "
            f"to the reference in %, binned at ±{bins} % · **blue = better than the reference** "
            "(lower error, higher ACC), red = worse · •: significant "
            f"({card.attrs['test_name']}, p < {card.attrs['alpha']})"
        )

    def _figure(self) -> Any:
        from wpeft.viz.scorecard import plot_scorecard

        return plot_scorecard(_drawn(self._card))

    def _table(self) -> pd.DataFrame:
        """The tidy scorecard: one row per (run, score)."""
        return _drawn(self._card).to_dataframe().reset_index()


# --------------------------------------------------------------------------- the session

#: View key -> its class.
VIEW_CLASSES: dict[str, type[View]] = {
    "overview": OverviewView,
    "fisher": FisherView,
    "attention": AttentionView,
    "skill": SkillView,
    "budget": BudgetView,
    "curves": CurvesView,
    "scorecard": ScorecardView,
}


class LazyViews(Mapping[str, View]):
    """A session's views by key (those of :data:`VIEWS`), each made on first lookup: a view
    never opened costs neither its widgets nor its Bokeh models."""

    def __init__(self, wb: Workbench) -> None:
        self._wb = wb
        self._made: dict[str, View] = {}

    def __getitem__(self, key: str) -> View:
        if key not in VIEW_CLASSES:
            raise KeyError(f"no view {key!r}; the views are {', '.join(VIEW_CLASSES)}")
        view = self._made.get(key)
        if view is None:
            view = self._made[key] = VIEW_CLASSES[key](self._wb)
        return view

    def __iter__(self) -> Iterator[str]:
        return iter(VIEW_CLASSES)

    def __len__(self) -> int:
        return len(VIEW_CLASSES)

    def __contains__(self, key: object) -> bool:
        return key in VIEW_CLASSES

    def built(self) -> list[View]:
        """The views made so far (opened or looked up), in :data:`VIEWS` order."""
        return [self._made[k] for k in VIEW_CLASSES if k in self._made]


class Workbench:
    """Everything one browser session owns. Build it with :func:`build_workbench`.

    Args:
        catalog: The shared catalog of RUNS_DIR.
        poll_ms: Interval of the shared change check (0: not watched; call :meth:`poll`).
        sync_url: Mirror the selection in the URL (needs a server session).
        theme: The page's theme, "light" or "dark" (an unknown one: light); None: the
            session's ``theme`` URL parameter (:func:`page_theme`). The template and the
            pre-rendered images (Fisher view) are drawn in it.
    """

    def __init__(self, catalog: Catalog, *, poll_ms: int = 2000, sync_url: bool = True,
                 theme: str | None = None) -> None:
        self.cat = catalog
        self.theme = page_theme() if theme is None else _pick(theme, THEMES, "light")
        self.sel = Selection()
        self.run_select = pn.widgets.Select(label="Run (A)", options={_NO_RUN: ""},
                                            css_classes=["wb-run"], sizing_mode="stretch_width")
        self.run_b_select = pn.widgets.Select(label="Compare with (run B, Skill maps)",
                                              options={_NO_RUN_B: ""}, css_classes=["wb-run-b"],
                                              sizing_mode="stretch_width")
        self.run_message = _message_pane("wb-run-message")
        self.status = pn.pane.Markdown("", css_classes=["wb-status"], sizing_mode="stretch_width")
        _bind(self.run_select, self.sel, "run")
        _bind(self.run_b_select, self.sel, "run_b")
        self.runs_select = pn.widgets.MultiChoice(
            label="Compare runs (curves, scorecard, budget)", options={}, value=[],
            css_classes=["wb-runs"], sizing_mode="stretch_width")
        _bind(self.runs_select, self.sel, "runs", join_names)
        # each view's widgets and panes are made when it is first opened (or looked up)
        self.views = LazyViews(self)
        # A button bar and one slot rather than pn.Tabs: only the visible view is in the page
        # (bokeh's Tabs mis-lays out a grid of plots next to other plots in the same tab).
        self.nav = pn.widgets.RadioButtonGroup(
            options={title: key for key, title in VIEWS.items()}, value="overview",
            color="primary", variant="outline", css_classes=["wb-nav"])
        self.nav.param.watch(self._nav_changed, "value")
        self.main = pn.Column(self.nav, pn.Spacer(height=0),  # the shown view's panel
                              sizing_mode="stretch_width", css_classes=["wb-main"])
        self.sel.param.watch(self._view_changed, "view")
        self.sel.param.watch(self._runs_changed, ["run", "run_b", "runs"])
        location = pn.state.location if sync_url else None
        if location is not None:
            location.sync(self.sel, {p: p for p in URL_PARAMETERS})
            # the browser reports its own query once connected: then write the whole selection
            # back, so the address bar can be shared as soon as the page shows
            pn.state.onload(lambda: location.update_query(**self.url_query()))
        self._refresh_run_options()
        if not _text(self.sel.run):
            default = self.cat.default_run()
            if default:
                self.sel.run = default
        self._show_run_state()
        self._view_changed()
        self._signature = self._poll_signature()
        self._update_status()
        doc = pn.state.curdoc
        if poll_ms and doc is not None and doc.session_context:
            _watch_runs(self, doc, poll_ms / 1000)  # one watcher thread for all sessions

    def url_query(self) -> dict[str, str]:
        """The selection as URL query values (unset values left out)."""
        out = {}
        for name in URL_PARAMETERS:
            value = getattr(self.sel, name)
            if value is not None and value != "":
                out[name] = value if isinstance(value, str) else json.dumps(value)
        return out

    # --- runs ---------------------------------------------------------------------------------

    def default_task(self) -> str:
        try:
            return self.run_a().task
        except WpeftError:
            return ""

    def run_a(self) -> RunEntry:
        """The selected run (A), validated (RunNameError with a clear message otherwise)."""
        return self.cat.resolve(self.sel.run)

    def run_b(self) -> RunEntry | None:
        """Run B of the skill comparison; None if none is chosen or it is run A."""
        name = _text(self.sel.run_b)
        if not name or name == _text(self.sel.run):
            return None
        return self.cat.resolve(name)

    def _refresh_run_options(self) -> None:
        runs = self.cat.runs()
        a_opts = {_NO_RUN: "", **{e.label: e.name for e in runs}}
        b_opts = {_NO_RUN_B: "", **{e.label: e.name for e in runs if e.has_fields}}
        _set(self.run_select, options=a_opts,
             value=_pick(self.sel.run, list(a_opts.values()), ""))
        _set(self.run_b_select, options=b_opts,
             value=_pick(self.sel.run_b, list(b_opts.values()), ""))
        self._sync_runs_select()

    def _sync_runs_select(self) -> None:
        options = {e.label: e.name for e in self.cat.runs()}
        chosen = [n for n in split_names(self.sel.runs) if n in options.values()]
        _set(self.runs_select, options=options, value=chosen)

    def chosen_runs(self) -> list[RunEntry]:
        """The runs of ``Selection.runs`` that resolve, in order (refused names are named in
        the sidebar, :meth:`_show_run_state`); empty when none is chosen."""
        out = []
        for name in split_names(self.sel.runs):
            try:
                out.append(self.cat.resolve(name))
            except RunNameError:
                continue
        return out

    def _runs_changed(self, *events: param.parameterized.Event) -> None:
        _set(self.run_select, value=_pick(self.sel.run, list(self.run_select.options.values()), ""))
        _set(self.run_b_select,
             value=_pick(self.sel.run_b, list(self.run_b_select.options.values()), ""))
        self._sync_runs_select()
        self._show_run_state()
        for view in self.views.built():
            if view.key != "overview":
                view.stale = True
        self.views[self._view_key()].refresh()

    def _show_run_state(self) -> None:
        """A sidebar message when a run name from the URL is refused."""
        problems = []
        chosen = [("Compare runs", n) for n in split_names(self.sel.runs)]
        for label, value in (("Run", self.sel.run), ("Run B", self.sel.run_b), *chosen):
            if not _text(value):
                continue
            try:
                self.cat.resolve(value)
            except RunNameError as e:
                problems.append(f"{label}: {self.cat.sanitize(str(e))}")
        self.run_message.object = "".join(alert_html(p) for p in problems)
        self.run_message.visible = bool(problems)

    def no_runs_html(self) -> str:
        return alert_html(
            "No runs found in this runs directory ({}) yet. Make one with {} or run {}, where "
            "RUNS_DIR is the directory this server shows: it appears here within a few seconds, "
            "no reload needed.", "info",
            code=(self.cat.root.name,
                  ("wpeft train --task downscaling --method weatherpeft --budget 0.04 "
                   "--out RUNS_DIR/downscaling/weatherpeft-4pct"),
                  "wpeft demo --out RUNS_DIR"),
        )

    # --- views --------------------------------------------------------------------------------

    def _view_key(self) -> str:
        return _pick(self.sel.view, list(VIEWS))

    def _nav_changed(self, event: param.parameterized.Event) -> None:
        self.sel.view = event.new

    def _view_changed(self, *events: param.parameterized.Event) -> None:
        key = self._view_key()
        if self.sel.view != key:
            self.sel.view = key  # an unknown view from the URL: back to the overview
            return
        _set(self.nav, value=key)
        view = self.views[key]
        if view.stale:
            view.refresh()
        if self.main[1] is not view.panel:
            self.main[1] = view.panel

    # --- polling ------------------------------------------------------------------------------

    def poll(self) -> bool:
        """Redraw if a watched run wrote something since the last call; True if it did."""
        try:
            sig = self._poll_signature()
        except OSError:
            log.exception("workbench poll failed")
            return False
        if sig == self._signature:
            return False
        self._signature = sig
        self._refresh_run_options()
        self._show_run_state()
        for view in self.views.built():
            view.stale = True
        self.views[self._view_key()].refresh()
        self._update_status()
        return True

    def watched(self) -> tuple[list[str], list[str]]:
        """The runs this session watches: runs A and B and the compared runs, and (second) the
        runs whose ``metrics.jsonl`` counts: the curves' runs while the Curves view is shown."""
        names = [_text(self.sel.run), _text(self.sel.run_b), *split_names(self.sel.runs)]
        curves = []
        if self._view_key() == "curves":
            curves = split_names(self.sel.runs) or [_text(self.sel.run)]
        return names, curves

    def _poll_signature(self) -> tuple[Any, ...]:
        """What :meth:`poll` compares (see :meth:`watched`)."""
        names, curves = self.watched()
        return self.cat.signature(names, metrics=curves)

    def _update_status(self) -> None:
        runs = self.cat.runs()
        training = sum(not e.finished for e in runs)
        self.status.object = (
            f"**{len(runs)} runs** in `{_md(self.cat.root.name)}`"
            + (f", {training} training or interrupted" if training else "")
            + f" · checked {time.strftime('%H:%M:%S')}\n\n"
            "The address bar holds every selection: copy it to share this view."
        )

    # --- page ---------------------------------------------------------------------------------

    def template(self) -> pn.template.BaseTemplate:
        """The page in the session's :attr:`theme`. Plots follow the template's bokeh theme;
        colour maps stay those of :mod:`wpeft.viz.style`."""
        sidebar = [self.run_select, self.run_b_select, self.runs_select, self.run_message,
                   self.status]
        theme = self.theme
        return pn.template.BootstrapTemplate(
            title=f"wpeft workbench · {self.cat.root.name}", sidebar=sidebar, main=[self.main],
            sidebar_width=330, header_background="#0072B2",
            theme="dark" if theme == "dark" else "default",
            header=[theme_switch(theme)],
        )


#: Page themes (the ``theme`` URL parameter), the default first.
THEMES = ("light", "dark")


def page_theme(args: dict[str, list[Any]] | None = None) -> str:
    """The theme the session asked for in its URL (``?theme=dark``): one of :data:`THEMES`,
    "light" when absent or unknown. ``args``: request arguments (default: the session's)."""
    if args is None:
        args = pn.state.session_args or {}
    values = args.get("theme") or [b""]
    value = values[-1]
    return _pick(value.decode(errors="replace") if isinstance(value, bytes) else value, THEMES,
                 "light")


def theme_switch(theme: str) -> pn.widgets.Button:
    """A header button that reloads the page in the other theme (a template picks its theme
    when the page is made), keeping every other URL parameter."""
    other = "light" if theme == "dark" else "dark"
    button = pn.widgets.Button(label=f"{other} theme", color="light",
                               css_classes=["wb-theme"], width=120, align="center")
    button.js_on_click(args={"theme": other}, code=(
        "const url = new URL(window.location.href);"
        "url.searchParams.set('theme', theme); window.location.assign(url.href);"))
    return button


def workbench_view(runs_dir: str | os.PathLike[str], view: str, /, *, theme: str = "light",
                   **choices: Any) -> pn.Column:
    """One view of the workbench for a notebook: the widgets, plots and download buttons the
    dashboard shows for ``view`` (a key of :data:`VIEWS`) over ``runs_dir``, not watched
    (build it again to see new lines).

    Args:
        runs_dir: The runs directory (RUNS_DIR of ``wpeft serve``).
        view: ``"curves"``, ``"scorecard"``, ``"budget"``, ``"fisher"``, ...
        theme: ``"light"`` or ``"dark"``.
        choices: Parameters of :class:`Selection`, as the dashboard's URL holds them
            (``run="downscaling/full"``, ``runs=[...]`` (a list or comma-separated names),
            ``curve="val:rmse/2m_temperature"``, ``reference=...``).

    Raises:
        ConfigError: an unknown view or choice. Whatever the view raised when it drew (an
            unknown run, nothing to draw: what the dashboard shows in its message line).
    """
    if view not in VIEWS:
        raise ConfigError(f"Unknown workbench view {view!r}; choose one of {list(VIEWS)}.")
    allowed = [p for p in URL_PARAMETERS if p != "view"]  # the view is the argument
    unknown = sorted(set(choices) - set(allowed))
    if unknown:
        raise ConfigError(f"Unknown workbench choice(s) {unknown}; choose from {allowed}.")
    if not isinstance(choices.get("runs", ""), str):
        choices["runs"] = join_names([str(n) for n in choices["runs"]])
    wb = Workbench(catalog_for(runs_dir), poll_ms=0, sync_url=False, theme=theme)
    wb.sel.param.update(**choices)
    wb.sel.view = view
    shown = wb.views[view]
    if shown.error is not None:
        raise shown.error
    return shown.panel


def build_workbench(
    runs_dir: str | os.PathLike[str], *, poll_ms: int = 2000, sync_url: bool = True
) -> pn.template.BaseTemplate:
    """The workbench page of ``runs_dir`` for the current session (call once per session).

    Raises:
        RunsDirError: ``runs_dir`` is missing or not a directory.
    """
    pn.extension("tabulator", notifications=False)
    page = Workbench(catalog_for(runs_dir), poll_ms=poll_ms, sync_url=sync_url).template()
    _serve_panel_css_locally()
    return page


def _serve_panel_css_locally() -> None:
    """Point the session's Panel stylesheets at the server's own ``static/`` (as Panel's page
    handler does), also for a session built from its websocket.

    Panel's components name their CSS by a CDN address until the document's ``dist_url`` says
    otherwise, and only the handler of ``GET /workbench`` sets it. A session whose websocket
    reaches a server process that did not serve its page (``wpeft serve --num-procs N``: the
    forked processes share the port) is built from its token alone and would fetch Panel's CSS
    from the CDN, which an offline team cannot reach. Called after the page is made: creating
    ``pn.state.location`` rewrites a ``dist_url`` set before it.
    """
    from panel.io.resources import LOCAL_DIST

    doc = pn.state.curdoc
    if doc is not None and doc.session_context is not None:
        doc.template_variables.setdefault("dist_url", LOCAL_DIST)


def _watch_runs(wb: Workbench, doc: Any, interval: float) -> None:
    """Subscribe a session to its catalog's :class:`~wpeft.app.catalog.RunsWatcher`: when a
    run it shows changes, :meth:`Workbench.poll` runs on the session's own document (under its
    lock, as Bokeh requires); the subscription ends with the session. The watcher holds the
    workbench weakly, so a session that ends without notice cannot keep it alive."""
    from panel.io.state import set_curdoc

    watcher = wb.cat.watcher(interval)
    ref = weakref.ref(wb)

    def names() -> list[str]:
        w = ref()
        return w.watched()[0] if w is not None else []

    def metrics() -> list[str]:
        w = ref()
        return w.watched()[1] if w is not None else []

    def poll_in_doc() -> None:
        w = ref()
        if w is not None:
            with set_curdoc(doc):
                w.poll()

    def notify() -> None:
        if ref() is None:
            watcher.unsubscribe(token)
        else:
            doc.add_next_tick_callback(poll_in_doc)

    token = watcher.subscribe(names, notify, metrics)
    doc.on_session_destroyed(lambda _ctx: watcher.unsubscribe(token))
