"""Map axes for (latitude, longitude) fields: real Earth (cartopy) or the synthetic world.

* ``earth=True``: a cartopy PlateCarree map with coastlines read from a **local** shapefile, never
  from the network. cartopy's own ``ax.coastlines()`` would download Natural Earth on first use
  and fail offline, so it is not used. Searched, in order (first hit wins):

  1. ``$WPEFT_CARTOPY_DATA`` — if set, the only folder searched;
  2. ``cartopy.config["pre_existing_data_dir"]`` and ``cartopy.config["data_dir"]``;
  3. ``/usr/share/cartopy/data`` (Debian/Ubuntu package ``python-cartopy-data``).

  In each folder: GSHHS level-1 ``shapefiles/gshhs/<res>/GSHHS_<res>_L1.shp`` or Natural Earth
  ``shapefiles/natural_earth/physical/ne_<scale>_coastline.shp``, crude first for global maps,
  finer first for regional ones (Debian ships the crude GSHHS ``c`` only). Without any of them
  the map is drawn without coastlines and a :class:`UserWarning` says so. The first time an
  Earth map is drawn, an unset ``cartopy.config["pre_existing_data_dir"]`` is pointed at the
  folder found, so other cartopy code (e.g. ``GSHHSFeature``) finds the local data too.
* ``earth=False``: the embedded synthetic planet — plain longitude/latitude axes, no coastlines
  (its continents are not Earth's), labelled as the synthetic world.

Regional grids whose longitudes cross 0° (e.g. 350..359.75 and 0..2) are shown on a continuous
axis (-10..2) by :func:`display_longitudes`.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.colors import Normalize

from wpeft.errors import DataError

__all__ = [
    "COASTLINE_ENV",
    "DEBIAN_CARTOPY_DATA",
    "add_coastlines",
    "cartopy_data_dirs",
    "coastline_lines",
    "display_longitudes",
    "draw_field",
    "find_coastlines",
    "grid_extent",
    "hatch_cells",
    "is_global",
    "latlon_field",
    "map_axes",
]

COASTLINE_ENV = "WPEFT_CARTOPY_DATA"
DEBIAN_CARTOPY_DATA = Path("/usr/share/cartopy/data")
_GSHHS = "shapefiles/gshhs/{0}/GSHHS_{0}_L1.shp"
_NE = "shapefiles/natural_earth/physical/ne_{0}_coastline.shp"
#: Candidate files, coarse first (global maps) or fine first (regional maps).
_COASTLINE_FILES = {
    False: (_GSHHS.format("c"), _NE.format("110m"), _GSHHS.format("l"), _NE.format("50m")),
    True: (_GSHHS.format("i"), _GSHHS.format("l"), _NE.format("50m"), _GSHHS.format("c"),
           _NE.format("110m")),
}
SYNTHETIC_XLABEL = "longitude (°E), synthetic world"
SYNTHETIC_YLABEL = "latitude (°N)"


# --------------------------------------------------------------------------- coastline data


def cartopy_data_dirs() -> list[Path]:
    """The folders searched for coastline shapefiles, in order (see the module docstring)."""
    env = os.environ.get(COASTLINE_ENV)
    if env:
        return [Path(env)]
    dirs: list[Path] = []
    try:
        import cartopy

        for key in ("pre_existing_data_dir", "data_dir"):
            value = cartopy.config.get(key)
            if value and str(value) not in ("", "."):
                dirs.append(Path(value))
    except ImportError:
        pass
    dirs.append(DEBIAN_CARTOPY_DATA)
    return dirs


def find_coastlines(fine: bool = False) -> Path | None:
    """Path of the first local coastline shapefile, or ``None`` when there is none.

    ``fine`` prefers higher-resolution files (for regional maps) when present; Debian's
    ``python-cartopy-data`` ships the crude GSHHS ``c`` level-1 coastlines only.
    """
    for folder in cartopy_data_dirs():
        for rel in _COASTLINE_FILES[fine]:
            path = folder / rel
            if path.is_file():
                return path
    return None


@functools.lru_cache(maxsize=4)
def _coastline_geometries(path: str) -> tuple[Any, ...]:
    """Shapely geometries of a local shapefile (lon in -180..180), read once per path."""
    import logging

    from cartopy.io.shapereader import Reader  # local file reader; never downloads

    log = logging.getLogger("shapefile")  # pyshp logs harmless ring-orientation notes
    level = log.level
    log.setLevel(logging.ERROR)
    reader = Reader(path)
    try:
        return tuple(reader.geometries())
    finally:
        reader.close()
        log.setLevel(level)


def _real_coast(xy: np.ndarray) -> list[np.ndarray]:
    """Split a ring ``(n, 2)`` into runs of real coastline: drop the artificial segments that
    polygons crossing the antimeridian (both ends at lon ±180) or closing over the South Pole
    (an end at lat -90) have."""
    on_seam = np.abs(xy[:, 0]) >= 180.0 - 1e-9
    at_pole = xy[:, 1] <= -90.0 + 1e-9
    bad = (on_seam[:-1] & on_seam[1:]) | at_pole[:-1] | at_pole[1:]
    good = np.flatnonzero(~bad)
    if good.size == 0:
        return []
    runs = np.split(good, np.flatnonzero(np.diff(good) > 1) + 1)
    return [xy[r[0] : r[-1] + 2] for r in runs]


@functools.lru_cache(maxsize=4)
def _coastline_outlines(path: str) -> np.ndarray:
    """The shapefile's coastlines as shapely LineStrings (see :func:`_real_coast`)."""
    import shapely

    geoms = np.array(_coastline_geometries(path), dtype=object)
    polys = geoms[shapely.get_type_id(geoms) >= 3]  # (multi)polygons; line files pass as is
    rings = list(shapely.get_rings(shapely.get_parts(polys))) if polys.size else []
    lines = list(shapely.get_parts(geoms[shapely.get_type_id(geoms) < 3]))
    out = [
        run
        for g in rings + lines
        for run in _real_coast(shapely.get_coordinates(g))
        if len(run) > 1
    ]
    return np.array([shapely.LineString(c) for c in out], dtype=object)


def coastline_lines(
    extent: tuple[float, float, float, float] | None = None, *, fine: bool = False
) -> list[np.ndarray]:
    """Local coastlines as a list of ``(n, 2)`` (lon, lat) arrays, for plain (non-cartopy)
    plots such as HoloViews.

    With ``extent`` ``(lon0, lon1, lat0, lat1)`` the lines are clipped to it and given in the
    extent's longitude frame (e.g. 0..360 for a global 0..360 grid: the western hemisphere is
    shifted by +360). ``[]`` (and a warning) when no local data is found.
    """
    path = _coastlines_or_warn(fine)
    if path is None:
        return []
    import shapely
    from shapely.geometry import box

    geoms = _coastline_outlines(str(path))  # lines: clipping adds no edges along the extent
    if extent is None:
        pieces = [geoms]
    else:
        lon0, lon1, lat0, lat1 = extent
        pieces = []
        for shift in (-360.0, 0.0, 360.0):  # data frame = shapefile frame + shift
            clip = box(lon0 - shift, lat0, lon1 - shift, lat1)
            hit = geoms[shapely.intersects(geoms, clip)]
            if hit.size:
                pieces.append(shapely.transform(shapely.intersection(hit, clip),
                                                lambda xy, s=shift: xy + [s, 0.0]))
    lines = []
    for geom in (g for piece in pieces for g in piece):
        for part in shapely.get_parts(geom):
            if part.geom_type in ("LineString", "LinearRing") and len(part.coords) > 1:
                lines.append(np.asarray(part.coords)[:, :2])
    return lines


def _coastlines_or_warn(fine: bool = False) -> Path | None:
    path = find_coastlines(fine)
    if path is None:
        searched = ", ".join(str(d) for d in cartopy_data_dirs())
        warnings.warn(
            "No local coastline data found (searched: "
            f"{searched}); drawing the map without coastlines. Install the Debian/Ubuntu package "
            f"'python-cartopy-data' or point ${COASTLINE_ENV} at a cartopy data folder.",
            UserWarning,
            stacklevel=3,
        )
    return path


def add_coastlines(
    ax: Axes, *, fine: bool = False, color: str = "0.15", linewidth: float = 0.6
) -> bool:
    """Draw local coastlines on a cartopy GeoAxes; return ``False`` (after a warning) if none.

    The shapefile is read directly (no cartopy feature/downloader is involved), so this never
    touches the network. ``fine`` prefers higher-resolution data (regional maps).
    """
    path = _coastlines_or_warn(fine)
    if path is None:
        return False
    import cartopy.crs as ccrs

    ax.add_geometries(
        list(_coastline_outlines(str(path))),
        crs=ccrs.PlateCarree(),
        facecolor="none",
        edgecolor=color,
        linewidth=linewidth,
        zorder=3,
    )
    return True


def _point_cartopy_at_local_data() -> None:
    """Let other cartopy users (e.g. ``GSHHSFeature``) find the local data too."""
    import cartopy

    if str(cartopy.config.get("pre_existing_data_dir", "")) in ("", "."):
        path = find_coastlines()
        if path is not None:
            cartopy.config["pre_existing_data_dir"] = path.parents[3]


# --------------------------------------------------------------------------- grids


def latlon_field(field: xr.DataArray | xr.Dataset, variable: str | None = None) -> xr.DataArray:
    """A (latitude, longitude) DataArray from ``field``; size-1 extra dims are dropped.

    A Dataset must hold one variable or name it with ``variable``.
    """
    if isinstance(field, xr.Dataset):
        names = [str(n) for n in field.data_vars]
        if variable is None:
            if len(names) != 1:
                raise DataError(
                    f"The Dataset holds {len(names)} variables {names}; pick one with variable=."
                )
            variable = names[0]
        if variable not in field.data_vars:
            raise DataError(f"Variable {variable!r} is not in the Dataset (it has {names}).")
        field = field[variable]
    missing = {"latitude", "longitude"} - set(field.dims)
    if missing:
        raise DataError(
            f"A map needs dims latitude and longitude; {field.name!r} has {list(field.dims)}."
        )
    extra = [d for d in field.dims if d not in ("latitude", "longitude")]
    big = [d for d in extra if field.sizes[d] != 1]
    if big:
        raise DataError(
            f"{field.name!r} has extra dims {big} of size > 1; select one value first "
            f"(e.g. field.sel({big[0]}=...))."
        )
    return field.squeeze(extra, drop=True).transpose("latitude", "longitude")


def display_longitudes(field: xr.DataArray) -> xr.DataArray:
    """``field`` with longitudes made continuous for display, sorted increasingly.

    A regional grid crossing 0° (e.g. 350..359 and 0..2) becomes -10..2; grids that are
    contiguous in [0, 360) (global ones included) are returned with sorted longitudes only.
    """
    lon = np.mod(np.asarray(field["longitude"].values, dtype=float), 360.0)
    if lon.size < 2:
        return field
    order = np.sort(lon)
    gaps = np.diff(np.concatenate([order, [order[0] + 360.0]]))
    step = float(np.median(gaps[:-1])) if lon.size > 2 else float(gaps[0])
    widest = int(np.argmax(gaps))
    if gaps[widest] <= 1.5 * step or widest == lon.size - 1:
        new = lon  # global, or contiguous within [0, 360)
    else:
        start = order[widest + 1]  # first longitude after the hole
        new = np.mod(lon - start, 360.0) + start
        if start >= 180.0:
            new = new - 360.0
    return field.assign_coords(longitude=new).sortby("longitude")


def _edges(values: np.ndarray) -> np.ndarray:
    """Cell edges around (monotonic) cell centres."""
    v = np.asarray(values, dtype=float)
    if v.size == 1:
        return np.array([v[0] - 0.5, v[0] + 0.5])
    mid = (v[1:] + v[:-1]) / 2
    return np.concatenate([[2 * v[0] - mid[0]], mid, [2 * v[-1] - mid[-1]]])


def grid_extent(field: xr.DataArray) -> tuple[float, float, float, float]:
    """``(lon0, lon1, lat0, lat1)`` of the cell edges, latitudes clipped to [-90, 90]."""
    lon = _edges(field["longitude"].values)
    lat = np.clip(_edges(field["latitude"].values), -90.0, 90.0)
    return float(lon.min()), float(lon.max()), float(lat.min()), float(lat.max())


def is_global(field: xr.DataArray) -> bool:
    """The grid spans (nearly) all longitudes."""
    lon0, lon1, _, _ = grid_extent(field)
    return lon1 - lon0 >= 359.0


# --------------------------------------------------------------------------- axes


def map_axes(fig: Any, spec: Any, *, earth: bool) -> Axes:
    """A subplot at ``spec`` (e.g. ``(1, 3, 1)`` or a GridSpec cell): PlateCarree map if
    ``earth``, else plain axes. Raises ImportError naming the extra if cartopy is missing."""
    spec = spec if isinstance(spec, tuple) else (spec,)
    if not earth:
        return fig.add_subplot(*spec)
    try:
        import cartopy.crs as ccrs
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Real-Earth maps need cartopy: pip install 'wpeft[viz]' (or use earth=False)."
        ) from e
    _point_cartopy_at_local_data()
    return fig.add_subplot(*spec, projection=ccrs.PlateCarree())


def draw_field(
    ax: Axes, field: xr.DataArray, *, earth: bool, cmap: str, norm: Normalize
) -> Any:
    """Colour a (latitude, longitude) field on ``ax`` (from :func:`map_axes`) and dress the axes:
    coastlines and gridlines on Earth, plain degree axes on the synthetic world.

    Returns the :class:`~matplotlib.collections.QuadMesh` (for colourbars and tests).
    """
    field = display_longitudes(latlon_field(field))
    lon = field["longitude"].values
    lat = field["latitude"].values
    values = np.ma.masked_invalid(np.asarray(field.values, dtype=float))
    extent = grid_extent(field)
    kwargs: dict[str, Any] = {"cmap": cmap, "norm": norm, "shading": "nearest"}
    if earth:
        import cartopy.crs as ccrs

        kwargs["transform"] = ccrs.PlateCarree()
    mesh = ax.pcolormesh(lon, lat, values, **kwargs)
    if earth:
        if is_global(field):
            ax.set_global()
        else:
            ax.set_extent(extent, crs=ccrs.PlateCarree())
        add_coastlines(ax, fine=not is_global(field))
        gl = ax.gridlines(draw_labels=True, linewidth=0.3, color="0.5", alpha=0.6)
        gl.top_labels = gl.right_labels = False
    else:
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_aspect("equal")
        ax.set_xlabel(SYNTHETIC_XLABEL)
        ax.set_ylabel(SYNTHETIC_YLABEL)
    return mesh


def hatch_cells(
    ax: Axes, mask: xr.DataArray, *, earth: bool, hatch: str = "///", color: str = "0.3"
) -> Any:
    """Hatch the grid cells where the boolean (latitude, longitude) ``mask`` is True."""
    mask = display_longitudes(latlon_field(mask))
    values = np.asarray(mask.values, dtype=bool)
    kwargs: dict[str, Any] = {}
    if earth:
        import cartopy.crs as ccrs

        kwargs["transform"] = ccrs.PlateCarree()
    return ax.pcolor(
        mask["longitude"].values,
        mask["latitude"].values,
        np.ma.masked_where(~values, np.ones(values.shape)),
        shading="nearest",
        hatch=hatch,
        facecolor="none",
        edgecolor=color,
        linewidth=0.0,
        label="not significant",
        zorder=2,
        **kwargs,
    )
