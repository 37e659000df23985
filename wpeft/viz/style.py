"""Shared look of every wpeft figure: colormaps, method colours, labels with units, saving.

* Sequential data use ``viridis`` (``cividis`` for masks); signed data and differences use the
  diverging ``RdBu_r`` with limits symmetric about zero. All three are colour-blind safe.
* Methods get fixed colours from the Okabe-Ito palette and fixed markers, so a method looks the
  same in every figure.
* Labels come from a variable's ``long_name`` / ``units`` attributes, falling back to
  :data:`wpeft.data.schema.VARIABLES` (WB2 or Aurora short names), then to the name itself.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib.style
import numpy as np
import xarray as xr
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure

from wpeft.data.schema import VARIABLES
from wpeft.errors import DataError

__all__ = [
    "DIVERGING",
    "MASK",
    "METHOD_COLORS",
    "OKABE_ITO",
    "PNG_DPI",
    "SEQUENTIAL",
    "colorbar_label",
    "describe",
    "diverging_norm",
    "figure_png",
    "long_name",
    "method_style",
    "new_figure",
    "pretty_units",
    "save_figure",
    "sequential_norm",
    "strip_metric",
    "symmetric_limits",
    "themed",
    "themed_png",
    "units_of",
]

SEQUENTIAL = "viridis"
MASK = "cividis"
DIVERGING = "RdBu_r"

#: Okabe & Ito (2008) colour-blind-safe palette (black first is kept for "reference" lines).
OKABE_ITO = (
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#009E73",  # bluish green
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#CC79A7",  # reddish purple
    "#F0E442",  # yellow
    "#000000",  # black
)
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*", "<", ">", "h")

#: Fixed colours for the methods wpeft knows; others take the remaining palette entries in order.
METHOD_COLORS = {
    "WeatherPEFT": "#D55E00",
    "weatherpeft": "#D55E00",
    "Full-Tuning": "#000000",
    "full": "#000000",
    "LoRA": "#0072B2",
    "lora": "#0072B2",
    "VPT": "#009E73",
    "vpt": "#009E73",
    "AdaptFormer": "#56B4E9",
    "adaptformer": "#56B4E9",
    "BitFit": "#E69F00",
    "bitfit": "#E69F00",
    "SSF": "#CC79A7",
    "ssf": "#CC79A7",
}

_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
_UNIT_TOKEN = re.compile(r"^([A-Za-z%°]+)(-?\d+)$")


def pretty_units(units: str | None) -> str:
    """CF units with exponents as superscripts: ``"m s-1"`` -> ``"m s⁻¹"``; ``"1"`` -> ``""``."""
    if units is None:
        return ""
    units = str(units).strip()
    if units in ("", "1", "-", "dimensionless"):
        return ""
    out = []
    for token in units.split():
        m = _UNIT_TOKEN.match(token)
        out.append(m.group(1) + m.group(2).translate(_SUPERSCRIPT) if m else token)
    return " ".join(out)


#: Metric suffixes of skill variables (``2m_temperature_rmse``): display name, keeps units?
METRICS = {
    "rmse": ("RMSE", True),
    "bias": ("bias", True),
    "mae": ("MAE", True),
    "crps": ("CRPS", True),
    "acc": ("ACC", False),
    "seeps": ("SEEPS", False),
}
_LEVEL = re.compile(r"^(.+)_(\d+)$")


def _schema_spec(name: str):
    if name in VARIABLES:
        return VARIABLES[name]
    for s in VARIABLES.values():  # Aurora short names ("2t", "msl", ...)
        if s.aurora == name:
            return s
    return None


def strip_metric(name: str) -> str:
    """``"2m_temperature_rmse"`` -> ``"2m_temperature"``; names without a metric suffix as is."""
    base, _, suffix = name.rpartition("_")
    return base if base and suffix in METRICS else name


def describe(name: Any) -> tuple[str, str] | None:
    """``(long name, units)`` of a schema name, also with a level (``temperature_850``) and/or a
    metric suffix (``2m_temperature_rmse``, ``temperature_850_bias``); ``None`` if unknown."""
    if name is None:
        return None
    name = str(name)
    base = strip_metric(name)
    metric = name[len(base) + 1 :] if base != name else None
    name = base
    s = _schema_spec(name)
    if s is not None:
        long, units = s.long_name, s.units
    else:
        m = _LEVEL.match(name)
        s = _schema_spec(m.group(1)) if m else None
        if s is None:
            return None
        long, units = f"{s.long_name} at {m.group(2)} hPa", s.units
    if metric is not None:
        label, keeps_units = METRICS[metric]
        long, units = f"{label} of {long[0].lower() + long[1:]}", units if keeps_units else "1"
    return long, units


def long_name(obj: xr.DataArray | str | None, default: str = "") -> str:
    """Human-readable name: ``long_name`` attr, else from the schema (see :func:`describe`),
    else the name itself."""
    if isinstance(obj, xr.DataArray):
        if obj.attrs.get("long_name"):
            return str(obj.attrs["long_name"])
        obj = obj.name
    d = describe(obj)
    if d is not None:
        return d[0]
    return str(obj) if obj is not None else default


def units_of(obj: xr.DataArray | str | None) -> str:
    """Raw units string: ``units`` attr, else from the schema (:func:`describe`), else ``""``."""
    if isinstance(obj, xr.DataArray):
        if obj.attrs.get("units") is not None:
            return str(obj.attrs["units"])
        obj = obj.name
    d = describe(obj)
    return d[1] if d is not None else ""


def colorbar_label(obj: xr.DataArray | str | None, default: str = "") -> str:
    """``"long name (units)"`` for axes and colourbars; units omitted when dimensionless."""
    name = long_name(obj, default)
    units = pretty_units(units_of(obj))
    return f"{name} ({units})" if units else name


def symmetric_limits(values: Any, *, vmax: float | None = None) -> tuple[float, float]:
    """``(-m, m)`` with ``m`` = ``vmax`` or the largest finite ``|value|`` (1 if there is none)."""
    if vmax is None:
        arr = np.abs(np.asarray(values, dtype=float))
        arr = arr[np.isfinite(arr)]
        vmax = float(arr.max()) if arr.size else 0.0
    vmax = abs(float(vmax)) or 1.0
    return -vmax, vmax


def diverging_norm(values: Any, *, vmax: float | None = None) -> TwoSlopeNorm:
    """A :class:`TwoSlopeNorm` centred on zero, limits from :func:`symmetric_limits`."""
    lo, hi = symmetric_limits(values, vmax=vmax)
    return TwoSlopeNorm(vcenter=0.0, vmin=lo, vmax=hi)


def sequential_norm(values: Any, vmin: float | None = None, vmax: float | None = None) -> Normalize:
    """Linear limits from the finite data unless given; a constant field gets a unit-wide range."""
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    lo = float(vmin) if vmin is not None else (float(arr.min()) if arr.size else 0.0)
    hi = float(vmax) if vmax is not None else (float(arr.max()) if arr.size else 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return Normalize(vmin=lo, vmax=hi)


def method_style(methods: Sequence[str]) -> dict[str, dict[str, str]]:
    """``{method: {"color": ..., "marker": ...}}``, stable for known methods, palette order else."""
    free = [c for c in OKABE_ITO if c not in {METHOD_COLORS.get(m) for m in methods}]
    styles = {}
    for i, m in enumerate(methods):
        color = METHOD_COLORS.get(m)
        if color is None:
            color = free.pop(0) if free else OKABE_ITO[i % len(OKABE_ITO)]
        styles[m] = {"color": color, "marker": MARKERS[i % len(MARKERS)]}
    return styles


def new_figure(size: tuple[float, float], **kwargs: Any) -> Figure:
    """A pyplot-free :class:`Figure` (no global state, safe headless and in Panel) laid out with
    constrained layout."""
    kwargs.setdefault("layout", "constrained")
    return Figure(figsize=size, **kwargs)


#: Page themes of pre-rendered figures (a page's ``theme``): matplotlib styles on top of the
#: defaults. Dark: light text, axes and lines on a transparent background (the page shows
#: through). Colour maps are the same in both.
THEME_STYLES: dict[str, list[Any]] = {
    "light": [],
    "dark": ["dark_background", {"savefig.transparent": True, "figure.facecolor": "none"}],
}


@contextlib.contextmanager
def themed(theme: str) -> Iterator[None]:
    """Draw and save figures inside for a page theme (a key of :data:`THEME_STYLES`)."""
    if theme not in THEME_STYLES:
        raise DataError(f"Unknown theme {theme!r}: use one of {sorted(THEME_STYLES)}.")
    with matplotlib.style.context(THEME_STYLES[theme]):
        yield


#: Resolution of the pre-rendered images of :func:`figure_png` (the workbench's images).
PNG_DPI = 80


def figure_png(fig: Figure, *, dpi: int = PNG_DPI) -> bytes:
    """``fig`` as PNG bytes (``dpi`` dots per inch, no timestamp: the same figure gives the same
    bytes), for apps that show a pre-rendered image instead of an interactive plot."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def themed_png(draw: Callable[[], Figure], *, theme: str = "light", dpi: int = PNG_DPI) -> bytes:
    """The figure ``draw()`` makes, drawn and saved in a page ``theme`` (:func:`themed`), as PNG
    bytes (:func:`figure_png`)."""
    with themed(theme):
        return figure_png(draw(), dpi=dpi)


_FORMATS = {".png", ".pdf", ".svg"}


def save_figure(
    fig: Figure, path: str | Path, *, dpi: int = 150, size: tuple[float, float] | None = None
) -> Path:
    """Write ``fig`` as PNG, PDF or SVG (chosen by the suffix of ``path``) and return the path.

    Args:
        fig: The figure.
        path: Output file; missing parent folders are created.
        dpi: Resolution of raster output (and of rasterised parts of vector output).
        size: Optional ``(width, height)`` in inches to resize the figure to before saving.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise DataError(
            f"Cannot save a figure as {path.name!r}: use a .png, .pdf or .svg file name."
        )
    if size is not None:
        fig.set_size_inches(*size)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format=suffix[1:], bbox_inches="tight")
    return path
