"""Draw time of the dashboard's skill maps: HoloViews ``hv_skill_map`` built and rendered to a
Bokeh model, synthetic world (plain hv.Image) vs real Earth (GeoViews, PlateCarree, local
coastlines), on a global 32 x 64 and 180 x 360 grid and the UK box of the ERA5 sample::

    python benchmarks/bench_interactive_maps.py --repeat 5

Prints the median milliseconds per map (after one warm-up draw, which loads the shapefile).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import xarray as xr

GRIDS = {
    "global 32x64": (np.linspace(-87.19, 87.19, 32), np.arange(64) * 5.625),
    "global 180x360": (np.arange(180) - 89.5, np.arange(360) + 0.5),
    "UK 33x49 (0.25°)": (np.linspace(50.0, 58.0, 33), np.linspace(348.0, 360.0, 49)[:-1]),
}


def field(lat: np.ndarray, lon: np.ndarray) -> xr.DataArray:
    rng = np.random.default_rng(0)
    return xr.DataArray(rng.gamma(2.0, 0.5, (lat.size, lon.size)), name="rmse_2m_temperature",
                        dims=("latitude", "longitude"),
                        coords={"latitude": lat, "longitude": lon}, attrs={"units": "K"})


def draw_ms(da: xr.DataArray, earth: bool, repeat: int) -> float:
    import holoviews as hv

    from wpeft.viz.interactive import hv_skill_map

    renderer = hv.renderer("bokeh")
    renderer.get_plot(hv_skill_map(da, earth=earth))  # warm-up: imports, shapefile read
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        renderer.get_plot(hv_skill_map(da, earth=earth))
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed draws per case")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"{'grid':<20} {'synthetic (hv) ms':>18} {'Earth (gv) ms':>14}")
    for name, (lat, lon) in GRIDS.items():
        da = field(lat, lon)
        plain, earth = draw_ms(da, False, args.repeat), draw_ms(da, True, args.repeat)
        print(f"{name:<20} {plain:>18.0f} {earth:>14.0f}")


if __name__ == "__main__":
    main()
