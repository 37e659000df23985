"""Draw docs/world.png, the README's picture of the embedded world (needs the ``viz`` extra).

Run: ``python docs/make_world_figure.py``. It is a synthetic planet, so no coastlines are drawn.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from wpeft.data.world import open_world  # noqa: E402


def main(out: Path = Path(__file__).parent / "world.png") -> None:
    ds = open_world(progress=False).isel(time=400)
    lon, lat = ds.longitude.values, ds.latitude.values
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6), constrained_layout=True)
    z = ds.geopotential.sel(level=500) / 9.80665
    im = axes[0].pcolormesh(lon, lat, z, cmap="viridis", shading="auto")
    axes[0].contour(lon, lat, ds.land_sea_mask, levels=[0.5], colors="w", linewidths=0.8)
    fig.colorbar(im, ax=axes[0], label="500 hPa geopotential height (m)")
    u, v = ds["10m_u_component_of_wind"], ds["10m_v_component_of_wind"]
    im = axes[1].pcolormesh(lon, lat, np.hypot(u, v), cmap="magma", shading="auto")
    axes[1].quiver(lon[::2], lat[::2], u[::2, ::2], v[::2, ::2], color="w", scale=300)
    fig.colorbar(im, ax=axes[1], label="10 m wind speed (m s$^{-1}$)")
    tp = ds.total_precipitation_6hr.where(ds.total_precipitation_6hr > 0.1)
    axes[2].contour(lon, lat, ds.land_sea_mask, levels=[0.5], colors="0.4", linewidths=0.8)
    im = axes[2].pcolormesh(lon, lat, tp, cmap="Blues", shading="auto")
    fig.colorbar(im, ax=axes[2], label="6-hour precipitation (mm)")
    for ax in axes:
        ax.set_xlabel("longitude (°E)")
        ax.set_ylabel("latitude (°N)")
        ax.set_aspect("equal")
    when = np.datetime_as_string(ds.time.values, unit="h")
    fig.suptitle(f"wpeft embedded world (synthetic shallow-water planet, not Earth), {when}; "
                 "white/grey contour: its continents")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
