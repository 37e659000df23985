"""The embedded world: a seeded, synthetic but physical planet to pretrain and fine-tune on CPU.

Why: wpeft must run end to end (pretraining a small Aurora, fine-tuning, evaluation, ensembles,
downscaling) without downloading ERA5. A random field would teach nothing, so the default data
come from a small physical model with weather-like behaviour: travelling eddies on mid-latitude
jets, a moisture cycle with sparse heavy rain, continents with mountains. It is labelled honestly
everywhere: **a synthetic shallow-water planet, not Earth** (dataset attrs ``synthetic=1``).

Physics (one fluid layer on a rotating sphere of Earth's size, rotation and gravity):

* Dynamics: the rotating shallow-water equations in vorticity-divergence form, spectrally
  (triangular truncation ``T`` on a Legendre-Gauss grid), with torch-harmonics'
  :class:`~torch_harmonics.examples.ShallowWaterSolver` providing the transforms, wind inversion and
  Laplacians. The prognostic geopotential ``phi = g * eta`` is that of the free surface ``eta``;
  the fluid depth is ``eta - orography``, so mountains enter the mass flux (flow is steered around
  them, stationary waves form). Time stepping: third-order Adams-Bashforth for advection and
  forcing, Crank-Nicolson for the gravity-wave terms (``-lap(phi)`` in the divergence equation,
  ``-H g div`` in the height equation), i.e. a standard semi-implicit scheme, so the step is limited
  by advection (about 20 min at T21) rather than by the 313 m/s gravity waves.
* Forcing and damping keep the flow active over any length of run:
  Newtonian relaxation of the height field towards an equator-high / pole-low profile with a
  steep drop at +-45 deg (the "thermal" forcing; it builds barotropically unstable jets), a
  red-noise (AR(1)) stochastic vorticity stirring in mid-latitudes (a standard stand-in for the
  baroclinic eddy generation a single layer cannot do itself, cf. stochastically stirred barotropic
  jet models), Rayleigh drag on the winds (stronger over land), and del^8 hyperdiffusion of the
  smallest resolved scales. The relaxation acts on every spherical-harmonic degree except ``l = 0``,
  so total mass is conserved exactly even when forced.
* Moisture: column water vapour ``W`` (mm = kg m-2) is advected in flux form, ``dW/dt = -div(u W)
  + E - C``, spectrally like the dynamics (exactly conservative). Evaporation ``E`` relaxes ``W``
  towards ``evap_rh`` (85 %) of saturation, faster with stronger wind, and only weakly over land;
  warm (low latitude) ocean therefore supplies most water. Saturation follows Clausius-Clapeyron
  in the near-surface temperature, which is diagnosed from the free-surface height (a thicker
  column is warmer, so the equilibrium equator-pole height drop is an equator-pole temperature
  contrast), amplified over land and lapse-rate corrected on mountains; the column is also
  thinner over mountains. Whatever exceeds saturation condenses at once and falls as
  precipitation ``C``: a sparse, non-negative field with rain where moist air converges, cools or
  is lifted. Negative ``W`` from spectral ringing is filled by a global multiplicative fixer, so
  ``d(total W) = total E - total C`` holds to rounding.

Vertical structure (diagnostic -- the model has ONE layer): the layer's winds and height anomaly
are mapped to pressure levels with per-level factors (winds and geopotential anomalies grow with
height like a thermal-wind-balanced, equivalent-barotropic atmosphere; temperature anomalies are
the column temperature anomaly times a factor shrinking towards the tropopause), on top of a
standard atmosphere; specific humidity decays as ``(p / 1000 hPa) ** 3.5`` with its column integral
equal to ``W``. Surface fields: 2 m temperature from the column temperature with land amplification
and a lapse-rate correction, 10 m winds as a fraction of the layer wind turned towards low pressure
(Ekman turning), mean sea-level pressure from the height anomaly. These are honest, simple
diagnostics: levels are strongly correlated, which is fine for the purpose (a learnable world).

Grids: the solver runs on a Legendre-Gauss grid with the same number of points as the requested
output grid (``nlat x nlon``), truncated at ``T = min((nlon - 1) // 3, (2 nlat - 1) // 3)`` so
quadratic terms are alias free (T21 for 32 x 64). The output grid is cell-centred
(``lat = 90 - (i + 1/2) 180 / nlat``). Smooth fields (height, winds) are moved there *exactly* by
evaluating their spherical-harmonic expansion at the output latitudes (the Legendre tables of the
inverse transforms are re-evaluated at the cell-centre latitudes; longitudes coincide). Water
vapour and precipitation are not band limited (condensation is a threshold), and a spectral
evaluation would create negative rain by ringing, so they are interpolated linearly in latitude
(non-negative and still sparse; longitudes coincide, so no interpolation in longitude).
``total_precipitation_6hr`` at time ``t`` is the rain accumulated over ``(t - 6 h, t]``.

Ensembles: at ``ensemble_inits`` times the truth's spectral state is kept; members start from it
with small random smooth perturbations of vorticity and height and run a *perturbed model*
(stronger drag, faster relaxation, weaker stirring drawn independently of the truth's). Like real
ensembles they are biased and under-dispersive against the truth.

Caching: :func:`open_world` and :func:`open_world_ensemble` write zarr stores to
``cache_dir / f"world-{config.hash()}"`` atomically (temporary directory, then a rename) and reuse
them; any config change gives a new hash and a new world. The default world takes about 20 s
(truth, 260 simulated days) plus 25 s (ensemble, 48 x 10 forecasts of 48 h) on a 2-core CPU, runs
single-threaded (fastest for these small transforms, and immune to a busy second core) and needs
about 170 MB of cache.

Determinism: every random draw comes from ``torch.Generator``/``numpy`` streams seeded from
``config.seed``; the same config gives bit-identical data on the same machine and software stack.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch_harmonics as th
import xarray as xr
from torch_harmonics.examples import ShallowWaterSolver
from torch_harmonics.legendre import dlegpoly, legpoly
from tqdm.auto import tqdm

from wpeft.data.regrid import cell_area_weights, coarsen_conservative
from wpeft.data.schema import VARIABLES
from wpeft.errors import ConfigError

__all__ = [
    "WORLD_VERSION",
    "WorldConfig",
    "WorldModel",
    "WorldState",
    "open_world",
    "open_world_ensemble",
    "output_latitudes",
    "output_longitudes",
]

#: Bump when the generator changes in a way that changes the data (part of every config hash).
WORLD_VERSION = "1"

# physical constants (Earth-sized planet)
RADIUS = 6.37122e6  # m
OMEGA = 7.292e-5  # s-1
GRAVITY = 9.80616  # m s-2
RHO_AIR = 1.225  # kg m-3, near-surface air density for the pressure anomaly
L_OVER_RV = 2.5e6 / 461.5  # K, latent heat over the water-vapour gas constant (Clausius-Clapeyron)
T_SAT_REF = 300.0  # K, temperature at which saturation column water is wsat_ref_mm
LAPSE_RATE = 0.0065  # K m-1
VAPOUR_SCALE_HEIGHT = 2000.0  # m; the saturated column shrinks as exp(-orography / this)
Q_EXPONENT = 3.5  # specific humidity ~ (p / p0) ** Q_EXPONENT
P_SURFACE = 1.0e5  # Pa
SIX_HOURS = 6 * 3600.0  # s, the output interval
START_TIME = np.datetime64("2000-01-01T00:00:00", "ns")
_ENSEMBLE_BATCH = 96  # states per ensemble batch (init times x members)
STD_T0, STD_LAPSE, STD_R, STD_G = 288.15, 0.0065, 287.05, 9.80665  # ICAO standard atmosphere
STD_TROPOPAUSE_HPA, STD_T_TROPOPAUSE = 226.32, 216.65

_SURFACE = (
    "2m_temperature",
    "10m_u_component_of_wind",
    "10m_v_component_of_wind",
    "mean_sea_level_pressure",
    "total_precipitation_6hr",
)
_ATMOS = (
    "geopotential",
    "u_component_of_wind",
    "v_component_of_wind",
    "temperature",
    "specific_humidity",
)
_STATIC = ("land_sea_mask", "geopotential_at_surface", "soil_type")


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines an embedded world; equal configs give bit-identical worlds."""

    seed: int = 0  # seeds every random generator (continents, initial state, stirring, ensemble)
    nlat: int = 32  # fine output grid latitudes (cell-centred); also the solver's Gauss latitudes
    nlon: int = 64  # fine output grid longitudes
    coarse_factor: int = 4  # coarse grid = fine grid coarsened by this factor (8 x 16)
    levels: tuple[int, ...] = (850, 500, 250)  # pressure levels (hPa) of the atmos variables
    days: float = 240.0  # length of the stored trajectory after spin-up (multiple of 0.25)
    spinup_days: float = 20.0  # discarded spin-up from the unbalanced initial state
    ensemble_inits: int = 48  # ensemble forecasts started from the truth at this many init times
    ensemble_members: int = 10  # members per ensemble forecast
    ensemble_lead_hours: int = 48  # forecast lead time (multiple of 6)
    # --- dynamics ---
    forcing: bool = True  # False: bare shallow-water solver (no relaxation, drag, stirring)
    mean_depth_m: float = 10_000.0  # mean fluid depth H; gravity-wave speed sqrt(gH) ~ 313 m/s
    dt_seconds: float = 0.0  # solver step; 0 = automatic (advective CFL, divides 6 h)
    equator_pole_drop_m: float = 1500.0  # equator-to-pole drop of the equilibrium free surface
    jet_latitude_deg: float = 45.0  # where that drop is steepest (the equilibrium jets)
    jet_width_deg: float = 12.0  # width of the drop (tanh scale)
    relax_days: float = 3.0  # Newtonian relaxation time of the height field
    drag_days_sea: float = 20.0  # Rayleigh drag time over sea
    drag_days_land: float = 7.0  # Rayleigh drag time over land (rougher surface)
    hyperdiff_hours: float = 6.0  # e-folding time of the smallest resolved scale (del^8)
    stir_amplitude: float = 1.0e-10  # rms of the stochastic vorticity stirring (s-2)
    stir_days: float = 2.0  # decorrelation time of the stirring (AR(1))
    stir_lmin: int = 5  # stirred total wavenumbers: stir_lmin..stir_lmax (capped at truncation)
    stir_lmax: int = 12
    stir_latitude_deg: float = 45.0  # centre latitude of the stirring band (both hemispheres)
    stir_width_deg: float = 15.0  # Gaussian half-width of the stirring band
    # --- geography ---
    land_fraction: float = 0.3  # fraction of the planet's area that is land
    orography_max_m: float = 3000.0  # highest mountain
    continent_lmax: int = 8  # largest wavenumber of the continent field (smaller = bigger blobs)
    n_soil_types: int = 7  # soil types 1..n over land (0 over sea)
    # --- moisture and surface diagnostics ---
    wsat_ref_mm: float = 70.0  # saturation column water vapour at 300 K
    evap_days: float = 1.0  # time scale of evaporation towards evap_rh * saturation (ocean)
    evap_rh: float = 0.85  # relative humidity evaporation drives towards
    land_evap_factor: float = 0.3  # evaporation over land relative to ocean
    t_mean_k: float = 287.0  # global mean column temperature (2 m temperature at sea level)
    t_per_m: float = 0.04  # column temperature change per metre of free-surface anomaly (K m-1)
    surface_wind_factor: float = 0.25  # 10 m / layer wind, zonal-mean part, sea (x 0.7 on land)
    surface_eddy_factor: float = 0.5  # 10 m / layer wind, eddy part (departure from zonal mean)
    msl_eddy_factor: float = 0.6  # msl eddy anomaly / (rho g x layer height eddy)
    msl_mean_factor: float = 0.1  # msl zonal-mean anomaly / (rho g x zonal-mean height anomaly)
    # --- ensemble: initial-condition and model perturbations ---
    ens_ic_vorticity: float = 1.0e-6  # rms vorticity perturbation of the members (s-1)
    ens_ic_height_m: float = 1.0  # rms height perturbation of the members (m)
    ens_stir_factor: float = 0.6  # members' stirring amplitude / truth's
    ens_drag_factor: float = 1.3  # members' drag rate / truth's
    ens_relax_factor: float = 0.8  # members' relaxation time / truth's

    def __post_init__(self) -> None:
        # normalise types so that equal configs hash equally (5 vs 5.0, lists from JSON/YAML)
        levels = tuple(self.levels) if isinstance(self.levels, (tuple, list)) else None
        if levels is None or not all(
            isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in levels
        ):
            raise ConfigError(
                f"WorldConfig: levels={self.levels!r} must be a tuple of integer pressures (hPa), "
                "e.g. (850, 500, 250)."
            )
        object.__setattr__(self, "levels", tuple(int(p) for p in levels))
        for f in dataclasses.fields(self):
            val = getattr(self, f.name)
            if isinstance(val, bool):
                continue
            if f.type == "float" and isinstance(val, (int, np.integer, np.floating)):
                object.__setattr__(self, f.name, float(val))
            elif f.type == "int" and isinstance(val, np.integer):
                object.__setattr__(self, f.name, int(val))
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        """All fields as JSON-serialisable values (levels as a list)."""
        out = dataclasses.asdict(self)
        out["levels"] = list(self.levels)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorldConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"Unknown WorldConfig field(s) {unknown}; known: {sorted(names)}.")
        return cls(**data)

    def hash(self) -> str:
        """Stable 16-hex-digit hash over every field and :data:`WORLD_VERSION`."""
        payload = json.dumps(
            {"world_version": WORLD_VERSION, **self.to_dict()}, sort_keys=True, default=str
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    # derived quantities -------------------------------------------------------------------
    @property
    def n_times(self) -> int:
        """Number of stored 6-hourly truth times."""
        return int(round(self.days * 4))

    @property
    def n_spinup(self) -> int:
        """Number of 6-hour spin-up windows."""
        return int(round(self.spinup_days * 4))

    @property
    def truncation(self) -> int:
        """Triangular truncation T of the solver (alias free on the nlat x nlon Gauss grid)."""
        return min((self.nlon - 1) // 3, (2 * self.nlat - 1) // 3)

    @property
    def lead_steps(self) -> int:
        """Ensemble lead in 6-hour steps."""
        return self.ensemble_lead_hours // 6

    def init_indices(self) -> np.ndarray:
        """Indices (into the truth's time axis) of the ensemble init times, evenly spread."""
        last = self.n_times - 1 - self.lead_steps
        # spacing >= 1 (validated), so the rounded indices are distinct
        return np.floor(np.linspace(0, last, self.ensemble_inits) + 0.5).astype(np.int64)


def _validate(c: WorldConfig) -> None:
    """Raise :class:`ConfigError` naming the bad value and the fix."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"WorldConfig: {message}")

    def is_int(x: Any) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    def multiple_of_quarter(x: float) -> bool:
        return abs(x * 4 - round(x * 4)) < 1e-9

    need(is_int(c.seed) and c.seed >= 0, f"seed={c.seed!r} must be a non-negative integer.")
    for name in ("nlat", "nlon", "coarse_factor"):
        val = getattr(c, name)
        need(is_int(val) and val >= 1, f"{name}={val!r} must be a positive integer.")
    need(isinstance(c.forcing, bool), f"forcing={c.forcing!r} must be True or False.")
    need(c.nlat >= 8, f"nlat={c.nlat} is too small; use nlat >= 8 (e.g. 16 or 32).")
    need(
        c.nlon >= 2 * c.nlat - 2,
        f"nlon={c.nlon} is too small for nlat={c.nlat}; use nlon = 2 * nlat ({2 * c.nlat}).",
    )
    need(
        c.nlat % c.coarse_factor == 0 and c.nlon % c.coarse_factor == 0,
        f"grid {c.nlat} x {c.nlon} is not divisible by coarse_factor={c.coarse_factor}; choose "
        f"nlat and nlon as multiples of {c.coarse_factor} (e.g. nlat={c.coarse_factor * 8}).",
    )
    need(
        len(c.levels) > 0 and all(0 < p <= 1100 for p in c.levels),
        f"levels={c.levels!r} must be a non-empty tuple of integer pressures in hPa (0, 1100].",
    )
    need(len(set(c.levels)) == len(c.levels), f"levels={c.levels!r} contains duplicates.")
    need(
        c.days > 0 and multiple_of_quarter(c.days),
        f"days={c.days!r} must be positive and a multiple of 0.25 (6 h), e.g. 240.0.",
    )
    need(
        c.spinup_days > 0 and multiple_of_quarter(c.spinup_days),
        f"spinup_days={c.spinup_days!r} must be positive and a multiple of 0.25 (6 h).",
    )
    need(
        is_int(c.ensemble_lead_hours) and c.ensemble_lead_hours > 0
        and c.ensemble_lead_hours % 6 == 0,
        f"ensemble_lead_hours={c.ensemble_lead_hours!r} must be a positive multiple of 6.",
    )
    need(
        is_int(c.ensemble_members) and c.ensemble_members >= 1,
        f"ensemble_members={c.ensemble_members!r} must be a positive integer.",
    )
    available = c.n_times - c.lead_steps
    need(
        available >= 1,
        f"days={c.days} is too short for ensemble_lead_hours={c.ensemble_lead_hours}: the "
        f"trajectory has {c.n_times} times and the lead needs {c.lead_steps + 1}; increase days.",
    )
    need(
        is_int(c.ensemble_inits) and 1 <= c.ensemble_inits <= available,
        f"ensemble_inits={c.ensemble_inits!r} must be between 1 and {available} (the "
        f"trajectory of {c.n_times} times minus the {c.lead_steps}-step lead); lower it or "
        "increase days.",
    )
    positive = (
        "mean_depth_m", "equator_pole_drop_m", "jet_width_deg", "relax_days", "drag_days_sea",
        "drag_days_land", "hyperdiff_hours", "stir_days", "stir_width_deg", "wsat_ref_mm",
        "evap_days", "t_mean_k", "ens_drag_factor", "ens_relax_factor",
    )
    for name in positive:
        val = getattr(c, name)
        need(isinstance(val, (int, float)) and val > 0, f"{name}={val!r} must be positive.")
    non_negative = (
        "dt_seconds", "stir_amplitude", "orography_max_m", "land_evap_factor", "t_per_m",
        "surface_wind_factor", "surface_eddy_factor", "msl_eddy_factor", "msl_mean_factor",
        "ens_ic_vorticity", "ens_ic_height_m", "ens_stir_factor",
    )
    for name in non_negative:
        val = getattr(c, name)
        need(isinstance(val, (int, float)) and val >= 0, f"{name}={val!r} must be >= 0.")
    need(0 < c.land_fraction < 1, f"land_fraction={c.land_fraction!r} must be in (0, 1).")
    need(0 < c.evap_rh <= 1, f"evap_rh={c.evap_rh!r} must be in (0, 1].")
    need(
        c.orography_max_m < 0.5 * c.mean_depth_m,
        f"orography_max_m={c.orography_max_m} must stay below half the mean depth "
        f"({0.5 * c.mean_depth_m}) or the fluid runs dry over mountains; lower it.",
    )
    need(
        is_int(c.stir_lmin) and is_int(c.stir_lmax) and 1 <= c.stir_lmin <= c.stir_lmax,
        f"stir_lmin={c.stir_lmin!r}, stir_lmax={c.stir_lmax!r} must be integers, 1 <= min <= max.",
    )
    need(
        c.stir_lmin <= c.truncation,
        f"stir_lmin={c.stir_lmin} exceeds the truncation T{c.truncation} of a {c.nlat} x "
        f"{c.nlon} grid; lower it.",
    )
    need(
        is_int(c.continent_lmax) and c.continent_lmax >= 1,
        f"continent_lmax={c.continent_lmax!r} must be a positive integer.",
    )
    need(
        is_int(c.n_soil_types) and c.n_soil_types >= 1,
        f"n_soil_types={c.n_soil_types!r} must be a positive integer.",
    )
    if c.dt_seconds > 0:
        n = SIX_HOURS / c.dt_seconds
        need(
            abs(n - round(n)) < 1e-9,
            f"dt_seconds={c.dt_seconds} must divide 6 h (21600 s) exactly, e.g. 1200; or 0 (auto).",
        )


# --------------------------------------------------------------------------------------------
# grids and spectral evaluation off the solver grid
# --------------------------------------------------------------------------------------------


def output_latitudes(nlat: int) -> np.ndarray:
    """Cell-centred latitudes (degrees, strictly decreasing), e.g. 87.1875 ... -87.1875 for 32."""
    return 90.0 - (np.arange(nlat) + 0.5) * 180.0 / nlat


def output_longitudes(nlon: int) -> np.ndarray:
    """Longitudes 0, dlon, ..., 360 - dlon (degrees)."""
    return np.arange(nlon) * 360.0 / nlon


class _OffGridInverseSHT(th.InverseRealSHT):
    """Inverse scalar SHT evaluated at arbitrary latitudes (the solver's normalisation).

    The expansion ``sum_lm c_lm Y_lm`` is evaluated exactly at ``lat`` by re-evaluating the
    associated Legendre table of torch-harmonics' inverse transform at those latitudes.
    Input ``(..., L, M)`` complex; output ``(..., len(lat), nlon)``.
    """

    def __init__(self, lat_deg: np.ndarray, nlon: int, lmax: int) -> None:
        super().__init__(len(lat_deg), nlon, lmax=lmax, mmax=lmax, grid="legendre-gauss",
                         csphase=False)
        theta = torch.as_tensor(np.deg2rad(90.0 - np.asarray(lat_deg)), dtype=torch.float64)
        pct = legpoly(self.mmax, self.lmax, torch.cos(theta), norm=self.norm, inverse=True,
                      csphase=False)
        self.pct = pct.permute(0, 2, 1).contiguous()


class _OffGridInverseVectorSHT(th.InverseRealVectorSHT):
    """Inverse vector SHT (spheroidal/toroidal -> (u, v)) evaluated at arbitrary latitudes.

    Input ``(..., 2, L, M)`` complex; output ``(..., 2, len(lat), nlon)``.
    """

    def __init__(self, lat_deg: np.ndarray, nlon: int, lmax: int) -> None:
        super().__init__(len(lat_deg), nlon, lmax=lmax, mmax=lmax, grid="legendre-gauss",
                         csphase=False)
        theta = torch.as_tensor(np.deg2rad(90.0 - np.asarray(lat_deg)), dtype=torch.float64)
        dpct = dlegpoly(self.mmax, self.lmax, theta, norm=self.norm, inverse=True, csphase=False)
        self.dpct = dpct.permute(0, 1, 3, 2).contiguous()


def _lat_interp_matrix(src_deg: np.ndarray, dst_deg: np.ndarray) -> torch.Tensor:
    """Linear interpolation in latitude as a matrix, clamped at the edges.

    Returns ``(len(dst), len(src))`` with non-negative rows summing to 1.
    """
    order = np.argsort(src_deg)
    s = src_deg[order]
    x = np.clip(dst_deg, s[0], s[-1])
    i1 = np.clip(np.searchsorted(s, x, side="right"), 1, len(s) - 1)
    i0 = i1 - 1
    w = np.clip((x - s[i0]) / (s[i1] - s[i0]), 0.0, 1.0)
    mat = np.zeros((len(dst_deg), len(src_deg)))
    rows = np.arange(len(dst_deg))
    np.add.at(mat, (rows, order[i0]), 1.0 - w)
    np.add.at(mat, (rows, order[i1]), w)
    return torch.as_tensor(mat, dtype=torch.float64)


def _auto_dt(truncation: int) -> float:
    """Largest divisor of 6 h keeping the advective Courant number u T dt / a below 0.4 (u=100)."""
    dt_max = 0.4 * RADIUS / (100.0 * truncation)
    return SIX_HOURS / math.ceil(SIX_HOURS / dt_max)


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values, axis=None)
    v = values.ravel()[order]
    w = np.broadcast_to(weights, values.shape).ravel()[order]
    cdf = np.cumsum(w) / w.sum()
    return float(v[min(np.searchsorted(cdf, q), v.size - 1)])


def _seeds(seed: int, n: int) -> list[int]:
    """``n`` independent 63-bit seeds derived from ``seed`` (numpy SeedSequence)."""
    words = np.random.SeedSequence(seed).generate_state(n, dtype=np.uint64)
    return [int(w >> np.uint64(1)) for w in words]


def _surface_temperature(c: WorldConfig, eta_anom: Any, lsm: Any, orog: Any) -> Any:
    """Near-surface temperature (K) from the free-surface anomaly ``eta_anom`` (m).

    A thicker (higher) column is warmer: ``t_mean + t_per_m * eta_anom``; land amplifies the
    anomaly by 30 % (small heat capacity) and mountains are colder by the lapse rate. Works on
    numpy arrays and torch tensors alike (used by the physics and by the output diagnostics).
    """
    return c.t_mean_k + (1.0 + 0.3 * lsm) * c.t_per_m * eta_anom - LAPSE_RATE * orog


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------


@dataclass
class WorldState:
    """Batched model state (B independent planets on the same geography).

    Attributes:
        spec: Spectral state ``(B, 4, L, M)`` complex128: geopotential of the free surface
            ``g * eta`` (m2 s-2), relative vorticity (s-1), divergence (s-1), column water W (mm).
        stir: Spectral AR(1) stirring pattern ``(B, L, M)`` (s-2, before the latitude mask).
        generator: Random stream of the stirring.
        tendencies: Last (up to 3) explicit tendencies for Adams-Bashforth, newest first.
        precip: Precipitation since the last reset, ``(B, H, W)`` on the Gauss grid (mm).
        evap_total: Global-mean evaporation accumulated since the start, ``(B,)`` (mm).
        precip_total: Global-mean precipitation accumulated since the start, ``(B,)`` (mm).
    """

    spec: torch.Tensor
    stir: torch.Tensor
    generator: torch.Generator
    precip: torch.Tensor
    evap_total: torch.Tensor
    precip_total: torch.Tensor
    tendencies: list[torch.Tensor] = field(default_factory=list)


class WorldModel:
    """The forced shallow-water planet with moisture; one instance = one geography + physics.

    Args:
        config: The world's configuration.
        perturbed: Use the ensemble's perturbed physics (drag x ``ens_drag_factor``, relaxation
            time x ``ens_relax_factor``, stirring x ``ens_stir_factor``).
    """

    def __init__(self, config: WorldConfig, *, perturbed: bool = False) -> None:
        c = config
        self.config = c
        self.perturbed = perturbed
        T = c.truncation
        self.lmax = T + 1
        self.dt = c.dt_seconds if c.dt_seconds > 0 else _auto_dt(T)
        self.substeps = int(round(SIX_HOURS / self.dt))
        self.solver = ShallowWaterSolver(
            c.nlat, c.nlon, self.dt, lmax=self.lmax, mmax=self.lmax, grid="legendre-gauss",
            radius=RADIUS, omega=OMEGA, gravity=GRAVITY, havg=c.mean_depth_m,
        )
        s = self.solver
        dtype = torch.float64
        self.lat_s = s.lats.to(dtype)  # (H,) radians, decreasing (Gauss latitudes)
        self.lat_out = output_latitudes(c.nlat)
        self.lon_out = output_longitudes(c.nlon)
        self.quad = s.quad_weights.to(dtype) / (2.0 * c.nlon)  # (H, 1): global mean = sum(q * x)
        self.isht_out = _OffGridInverseSHT(self.lat_out, c.nlon, self.lmax)
        self.ivsht_out = _OffGridInverseVectorSHT(self.lat_out, c.nlon, self.lmax)
        self.lat_interp = _lat_interp_matrix(np.rad2deg(self.lat_s.numpy()), self.lat_out)

        ell = s.l.to(dtype)  # (L, M) degree of each coefficient
        self.k2 = ell * (ell + 1) / RADIUS**2  # (L, M), = -laplacian
        self.hyper = torch.exp(
            -(self.dt / (c.hyperdiff_hours * 3600.0)) * (ell * (ell + 1) / (T * (T + 1))) ** 4
        )
        self.phibar = GRAVITY * c.mean_depth_m
        self._build_geography()
        self._build_forcing()

    # -- geography ------------------------------------------------------------------------
    def _random_spec(
        self, gen: torch.Generator, lmin: int, lmax: int, slope: float
    ) -> torch.Tensor:
        """Random isotropic real-field spectrum ``(L, M)``, power ~ l**-slope on [lmin, lmax].

        Coefficients with ``m > 0`` are complex with variance split over real and imaginary
        parts (they stand for the ``+-m`` pair); ``m = 0`` ones are real. The draw depends on
        ``lmax``, not on the truncation, so e.g. the continents of a seed are the same on every
        grid that resolves them (degrees beyond the truncation are dropped).
        """
        K = lmax + 1
        re = torch.randn(K, K, generator=gen, dtype=torch.float64)
        im = torch.randn(K, K, generator=gen, dtype=torch.float64)
        ell = torch.arange(K, dtype=torch.float64)[:, None].expand(K, K)
        m = torch.arange(K, dtype=torch.float64)[None, :].expand(K, K)
        band = (ell >= lmin) & (m <= ell)
        amp = torch.where(band, (ell.clamp(min=1)) ** (-slope / 2), torch.zeros_like(ell))
        amp = torch.where(m > 0, amp / math.sqrt(2.0), amp)
        im = torch.where(m == 0, torch.zeros_like(im), im)
        out = torch.zeros(self.lmax, self.lmax, dtype=torch.complex128)
        n = min(K, self.lmax)
        out[:n, :n] = torch.complex(re * amp, im * amp)[:n, :n]
        return out

    def _build_geography(self) -> None:
        c = self.config
        s = self.solver
        seeds = _seeds(c.seed, 8)
        gen = torch.Generator().manual_seed(seeds[0])
        cont = self._random_spec(gen, 1, c.continent_lmax, 1.0)
        soil = self._random_spec(gen, 2, c.continent_lmax + 4, 1.0)
        f_out = self.isht_out(cont).numpy()
        f_s = s.isht(cont)
        area = cell_area_weights(self.lat_out)[:, None]
        thr = _weighted_quantile(f_out, area, 1.0 - c.land_fraction)
        top = float(f_out.max())

        def orography(f: np.ndarray | torch.Tensor) -> Any:
            x = (f - thr) / (top - thr)
            x = x.clip(0.0, 1.0) if isinstance(x, np.ndarray) else x.clamp(0.0, 1.0)
            return c.orography_max_m * x**1.5

        # output grid: exact land mask, orography, soil types (1..n over land by area quantiles)
        self.lsm_out = (f_out > thr).astype(np.float64)
        self.orog_out = orography(f_out)
        s_out = self.isht_out(soil).numpy()
        land = self.lsm_out > 0
        land_area = np.broadcast_to(area, s_out.shape)[land]
        edges = [
            _weighted_quantile(s_out[land], land_area, k / c.n_soil_types)
            for k in range(1, c.n_soil_types)
        ]
        self.soil_out = np.where(land, 1 + np.searchsorted(edges, s_out), 0).astype(np.float64)

        # solver grid: smooth mask for the physics, band-limited orography for the dynamics
        spread = float(f_out.std()) * 0.05
        self.lsm_s = torch.sigmoid((f_s - thr) / spread)  # (H, W)
        self.orog_s = orography(f_s)  # (H, W), used by the moisture physics
        orog_spec = s.sht(self.orog_s) * self.hyper  # light smoothing of the kink at the coast
        self.phis = GRAVITY * s.isht(orog_spec)  # (H, W), surface geopotential in the dynamics
        self.eta_mean = c.mean_depth_m + float((self.quad * self.phis).sum()) / GRAVITY

    # -- forcing --------------------------------------------------------------------------
    def _equilibrium_profile(self, lat_deg: np.ndarray | torch.Tensor) -> Any:
        """Equilibrium free-surface anomaly (m), zero area mean: high tropics, low poles."""
        c = self.config
        lat = torch.as_tensor(np.asarray(lat_deg), dtype=torch.float64)
        prof = -0.5 * torch.tanh((lat.abs() - c.jet_latitude_deg) / c.jet_width_deg)
        lat_s = torch.rad2deg(self.lat_s)
        prof_s = -0.5 * torch.tanh((lat_s.abs() - c.jet_latitude_deg) / c.jet_width_deg)
        mean = float(self.global_mean(prof_s[:, None].expand(c.nlat, c.nlon)))
        return c.equator_pole_drop_m * (prof - mean)

    def _build_forcing(self) -> None:
        c = self.config
        s = self.solver
        on = 1.0 if c.forcing else 0.0
        drag_f = c.ens_drag_factor if self.perturbed else 1.0
        relax_f = c.ens_relax_factor if self.perturbed else 1.0
        stir_f = c.ens_stir_factor if self.perturbed else 1.0
        day = 86400.0
        rate_sea, rate_land = 1.0 / (c.drag_days_sea * day), 1.0 / (c.drag_days_land * day)
        self.drag = on * drag_f * (rate_sea + (rate_land - rate_sea) * self.lsm_s)  # (H, W) s-1
        self.relax_rate = on / (c.relax_days * relax_f * day)
        eta_eq = self.eta_mean + self._equilibrium_profile(torch.rad2deg(self.lat_s))  # (H,)
        self.phi_eq_spec = s.sht(GRAVITY * eta_eq[:, None].expand(c.nlat, c.nlon).contiguous())

        # stirring: AR(1) in a band of total wavenumbers, masked to mid-latitudes on the grid
        L = self.lmax
        ell = torch.arange(L, dtype=torch.float64)[:, None].expand(L, L)
        m = torch.arange(L, dtype=torch.float64)[None, :].expand(L, L)
        band = (ell >= c.stir_lmin) & (ell <= min(c.stir_lmax, L - 1)) & (m <= ell)
        n_modes = float(sum(2 * l + 1 for l in range(c.stir_lmin, min(c.stir_lmax, L - 1) + 1)))
        sigma = on * stir_f * c.stir_amplitude * math.sqrt(4 * math.pi / n_modes)
        self.stir_band = band
        self.stir_decay = math.exp(-self.dt / (c.stir_days * day))
        self.stir_noise = sigma * math.sqrt(1.0 - self.stir_decay**2)
        lat_s = torch.rad2deg(self.lat_s)
        self.stir_mask = torch.exp(
            -(((lat_s.abs() - c.stir_latitude_deg) / c.stir_width_deg) ** 2)
        )[:, None]  # (H, 1)
        self.evap_rate = (1.0 - (1.0 - c.land_evap_factor) * self.lsm_s) / (c.evap_days * day)

    # -- state ----------------------------------------------------------------------------
    def initial_state(self) -> WorldState:
        """A single planet (B=1) at rest on the equilibrium height profile, with a little noise.

        The state is unbalanced (geostrophic adjustment happens during spin-up), with a small
        random vorticity field to break the zonal symmetry and a moist atmosphere at evap_rh.
        """
        c = self.config
        s = self.solver
        seeds = _seeds(c.seed, 8)
        gen = torch.Generator().manual_seed(seeds[1])
        phi = self.phi_eq_spec.clone()
        vort = self._random_spec(gen, 1, self.lmax - 1, 0.0)
        vort = vort * (5e-6 / self._grid_rms(vort))
        eta = self._equilibrium_profile(torch.rad2deg(self.lat_s))[:, None]
        t = _surface_temperature(c, eta, self.lsm_s, self.orog_s)
        w = c.evap_rh * self._wsat(t) * torch.ones(c.nlat, c.nlon, dtype=torch.float64)
        spec = torch.stack([phi, vort, torch.zeros_like(phi), s.sht(w)])[None]
        return self._new_state(spec, torch.Generator().manual_seed(seeds[2]))

    def _new_state(self, spec: torch.Tensor, generator: torch.Generator) -> WorldState:
        B = spec.shape[0]
        c = self.config
        return WorldState(
            spec=spec.clone(),
            stir=torch.zeros(B, self.lmax, self.lmax, dtype=torch.complex128),
            generator=generator,
            precip=torch.zeros(B, c.nlat, c.nlon, dtype=torch.float64),
            evap_total=torch.zeros(B, dtype=torch.float64),
            precip_total=torch.zeros(B, dtype=torch.float64),
        )

    def _grid_rms(self, spec: torch.Tensor) -> float:
        g = self.solver.isht(spec)
        return float(torch.sqrt((self.quad * g**2).sum()))

    def perturbed_states(self, spec: torch.Tensor, members: int, seed: int) -> WorldState:
        """Ensemble initial states: each of ``spec``'s ``N`` states repeated ``members`` times.

        Args:
            spec: Truth states ``(N, 4, L, M)``.
            members: Members per state.
            seed: Seed of the perturbations and of the members' stirring.
        Returns:
            State with ``B = N * members`` (member index fastest), each member with its own small
            random smooth vorticity and height perturbation (zero global mean: mass conserved).
        """
        c = self.config
        gen = torch.Generator().manual_seed(seed)
        spec = spec.repeat_interleave(members, dim=0).clone()
        B = spec.shape[0]
        pert = torch.stack(
            [self._random_spec(gen, 1, self.lmax - 1, 1.0) for _ in range(2 * B)]
        ).reshape(B, 2, self.lmax, self.lmax)
        rms = torch.sqrt((self.quad * self.solver.isht(pert) ** 2).sum((-2, -1)))[..., None, None]
        pert = pert / rms
        spec[:, 0] += GRAVITY * c.ens_ic_height_m * pert[:, 0]
        spec[:, 1] += c.ens_ic_vorticity * pert[:, 1]
        return self._new_state(spec, gen)

    # -- physics --------------------------------------------------------------------------
    def _wsat(self, t: torch.Tensor) -> torch.Tensor:
        """Saturation column water vapour (mm), Clausius-Clapeyron, thinner over mountains."""
        c = self.config
        return (
            c.wsat_ref_mm
            * torch.exp(L_OVER_RV * (1.0 / T_SAT_REF - 1.0 / t))
            * torch.exp(-self.orog_s / VAPOUR_SCALE_HEIGHT)
        )

    def _moisture(
        self, w: torch.Tensor, eta_anom: torch.Tensor, speed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Condensation, evaporation and conservative hole filling on the Gauss grid.

        Args:
            w: Column water ``(B, H, W)`` (mm), may be slightly negative from spectral ringing.
            eta_anom: Free-surface anomaly ``(B, H, W)`` (m).
            speed: Layer wind speed ``(B, H, W)`` (m s-1).
        Returns:
            ``(increment, condensation, evaporation)``, each ``(B, H, W)`` in mm per step, with
            ``global_mean(increment) == global_mean(evaporation - condensation)`` to rounding.
        """
        c = self.config
        wsat = self._wsat(_surface_temperature(c, eta_anom, self.lsm_s, self.orog_s))
        cond = (w - wsat).clamp(min=0.0)
        w1 = w - cond
        gust = 1.0 + c.surface_wind_factor * speed / 5.0
        evap = self.dt * self.evap_rate * gust * (c.evap_rh * wsat - w1).clamp(min=0.0)
        w1 = w1 + evap
        neg = w1.clamp(max=0.0)
        w1 = w1 - neg
        deficit = -(self.quad * neg).sum((-2, -1))
        total = (self.quad * w1).sum((-2, -1)).clamp(min=1e-300)
        w1 = w1 * (1.0 - deficit / total)[:, None, None]
        return w1 - w, cond, evap

    # -- time stepping --------------------------------------------------------------------
    def step(self, st: WorldState) -> None:
        """Advance ``st`` by one time step ``dt`` in place (moisture physics, then dynamics)."""
        s = self.solver
        spec = st.spec
        grids = s.isht(torch.cat([spec[:, [0, 1, 3]], st.stir[:, None]], dim=1))  # (B, 4, H, W)
        phi, vort, w, stir_g = grids.unbind(1)
        uv = s.getuv(spec[:, 1:3])  # (B, 2, H, W): eastward, northward wind
        u, v = uv.unbind(1)
        ke = 0.5 * (u**2 + v**2)

        incr, cond, evap = self._moisture(w, phi / GRAVITY - self.eta_mean, torch.sqrt(2 * ke))
        w = w + incr
        st.precip += cond
        st.precip_total += (self.quad * cond).sum((-2, -1))
        st.evap_total += (self.quad * evap).sum((-2, -1))

        # vector fluxes: absolute-vorticity flux with drag folded in as -r k x u, mass, water
        absvort = vort + s.coriolis
        r = self.drag
        vort_flux = torch.stack([absvort * u + r * v, absvort * v - r * u], dim=1)
        depth_anom = (phi - self.phis - self.phibar)[:, None]
        flux = torch.stack([vort_flux, uv * depth_anom, uv * w[:, None]], dim=1)  # (B,3,2,H,W)
        cd = s.vrtdivspec(flux)  # (B, 3, 2, L, M): curl, divergence
        scal = s.sht(torch.stack([ke, stir_g * self.stir_mask, incr], dim=1))  # (B, 3, L, M)

        tend = torch.empty_like(spec)
        relax = self.relax_rate * (self.phi_eq_spec - spec[:, 0])
        relax[:, 0, 0] = 0.0  # mass-neutral: the relaxation only redistributes the fluid
        stir = scal[:, 1].clone()
        stir[:, 0, 0] = 0.0  # vorticity has zero global mean
        tend[:, 0] = -cd[:, 1, 1] + relax
        tend[:, 1] = -cd[:, 0, 1] + stir
        tend[:, 2] = cd[:, 0, 0] + self.k2 * scal[:, 0]  # -lap(K); -lap(phi) is implicit
        tend[:, 3] = -cd[:, 2, 1]
        spec = spec.clone()
        spec[:, 3] += scal[:, 2]  # the physics increment of W (split step)

        st.tendencies.insert(0, tend)
        del st.tendencies[3:]
        if len(st.tendencies) == 1:
            expl = tend
        elif len(st.tendencies) == 2:
            expl = 1.5 * tend - 0.5 * st.tendencies[1]
        else:
            expl = (23 * tend - 16 * st.tendencies[1] + 5 * st.tendencies[2]) / 12
        dt, k2, hb = self.dt, self.k2, self.phibar
        new = spec + dt * expl
        # Crank-Nicolson for the gravity waves: d(div)/dt = k2 phi, d(phi)/dt = -H g div
        a = new[:, 2] + 0.5 * dt * k2 * spec[:, 0]
        b = new[:, 0] - 0.5 * dt * hb * spec[:, 2]
        div = (a + 0.5 * dt * k2 * b) / (1.0 + 0.25 * dt**2 * k2 * hb)
        phi_new = b - 0.5 * dt * hb * div
        st.spec = torch.stack([phi_new, new[:, 1], div, new[:, 3]], dim=1) * self.hyper

        noise = torch.complex(
            torch.randn(st.stir.shape, generator=st.generator, dtype=torch.float64),
            torch.randn(st.stir.shape, generator=st.generator, dtype=torch.float64),
        ) / math.sqrt(2.0)
        noise = torch.where(self.stir_band, noise, torch.zeros_like(noise))
        noise[..., 0] = noise[..., 0].real * math.sqrt(2.0) + 0j
        st.stir = self.stir_decay * st.stir + self.stir_noise * noise

    def advance(self, st: WorldState, hours: int = 6) -> None:
        """Run ``hours`` (a multiple of 6) in place; ``st.precip`` is reset first."""
        st.precip.zero_()
        for _ in range(hours // 6 * self.substeps):
            self.step(st)

    # -- diagnostics ----------------------------------------------------------------------
    def global_mean(self, grid: torch.Tensor) -> torch.Tensor:
        """Area mean over the Gauss grid (exact if band limited): ``(..., H, W) -> (...)``."""
        return (self.quad * grid).sum((-2, -1))

    def mass(self, st: WorldState) -> torch.Tensor:
        """Global-mean fluid depth ``(B,)`` (m); conserved exactly by the dynamics."""
        return self.global_mean(self.solver.isht(st.spec[:, 0]) - self.phis) / GRAVITY

    def total_water(self, st: WorldState) -> torch.Tensor:
        """Global-mean column water ``(B,)`` (mm)."""
        return self.global_mean(self.solver.isht(st.spec[:, 3]))

    def raw_output(self, st: WorldState) -> dict[str, np.ndarray]:
        """The state on the cell-centred output grid, ``(B, H_out, W_out)`` arrays.

        ``eta`` free-surface anomaly (m, zero global mean), ``u``/``v`` layer wind (m s-1),
        ``w`` column water (mm), ``precip`` accumulated since the last reset (mm).
        """
        s = self.solver
        eta = self.isht_out(st.spec[:, 0]) / GRAVITY - self.eta_mean
        uv = self.ivsht_out(s.invlap * st.spec[:, 1:3] / RADIUS)
        w = s.isht(st.spec[:, 3]).clamp(min=0.0)

        def lat_mix(x: torch.Tensor) -> torch.Tensor:  # (B, H, W) Gauss -> (B, H_out, W)
            return torch.einsum("oh,bhw->bow", self.lat_interp, x)

        return {
            "eta": eta.numpy(),
            "u": uv[:, 0].numpy(),
            "v": uv[:, 1].numpy(),
            "w": lat_mix(w).numpy(),
            "precip": lat_mix(st.precip).clamp(min=0.0).numpy(),
        }


# --------------------------------------------------------------------------------------------
# diagnostic vertical structure and surface fields
# --------------------------------------------------------------------------------------------


def _std_atmosphere(p_hpa: float) -> tuple[float, float]:
    """ICAO standard atmosphere: (geopotential height m, temperature K) at pressure p."""
    if p_hpa >= STD_TROPOPAUSE_HPA:
        expo = STD_R * STD_LAPSE / STD_G
        ratio = (p_hpa / 1013.25) ** expo
        return STD_T0 / STD_LAPSE * (1.0 - ratio), STD_T0 * ratio
    expo = STD_R * STD_LAPSE / STD_G
    z_trop = STD_T0 / STD_LAPSE * (1.0 - (STD_TROPOPAUSE_HPA / 1013.25) ** expo)
    z = z_trop + STD_R * STD_T_TROPOPAUSE / STD_G * math.log(STD_TROPOPAUSE_HPA / p_hpa)
    return z, STD_T_TROPOPAUSE


def _wind_factor(p_hpa: float) -> float:
    """Level wind (and geopotential anomaly) per unit layer value: 0.2 at 850, 1 at 250 hPa."""
    return float(np.clip(0.1 + 0.9 * math.log(1000.0 / p_hpa) / math.log(4.0), 0.05, 1.3))


def _temperature_factor(p_hpa: float) -> float:
    """Level temperature anomaly per column anomaly: ~0.85 at 850, ~0.67 at 500, ~0.37 at 250."""
    x = float(np.clip(math.log(p_hpa / 200.0) / math.log(5.0), 0.0, 1.0))
    return 0.2 + 0.7 * x**0.7


def _derive(
    raw: dict[str, np.ndarray], model: WorldModel
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Surface ``(N, H, W)`` and atmos ``(N, P, H, W)`` float32 variables from raw output."""
    c = model.config
    eta, u, v, w = raw["eta"], raw["u"], raw["v"], raw["w"]
    lsm, orog = model.lsm_out, model.orog_out
    lat = model.lat_out[:, None]
    t_col = c.t_mean_k + c.t_per_m * eta
    eta_zm = eta.mean(axis=-1, keepdims=True)  # instantaneous zonal mean, (N, H, 1)
    surface = {
        # land amplifies temperature anomalies (small heat capacity); mountains are colder
        "2m_temperature": _surface_temperature(c, eta, lsm, orog),
        # hydrostatic-style: rho g times a fraction of the height anomaly; eddies (lows and
        # highs) get a larger fraction than the zonal-mean equator-pole contrast
        "mean_sea_level_pressure": 101325.0
        + RHO_AIR * GRAVITY * (c.msl_eddy_factor * (eta - eta_zm) + c.msl_mean_factor * eta_zm),
        "total_precipitation_6hr": raw["precip"],
    }
    # 10 m wind: fractions of the layer wind's zonal mean and eddies (less over land), turned
    # towards low pressure (Ekman turning: 20 deg over sea, 35 deg over land, to the left in NH)
    angle = np.deg2rad(np.sign(lat) * (20.0 + 15.0 * lsm))
    land = 1.0 - 0.3 * lsm
    u_s, v_s = (
        land * (c.surface_wind_factor * x.mean(axis=-1, keepdims=True)
                + c.surface_eddy_factor * (x - x.mean(axis=-1, keepdims=True)))
        for x in (u, v)
    )
    surface["10m_u_component_of_wind"] = u_s * np.cos(angle) - v_s * np.sin(angle)
    surface["10m_v_component_of_wind"] = u_s * np.sin(angle) + v_s * np.cos(angle)
    q_surface = w * GRAVITY * (1.0 + Q_EXPONENT) / P_SURFACE  # column integral of q(p) equals W
    atmos: dict[str, list[np.ndarray]] = {n: [] for n in _ATMOS}
    for p in c.levels:
        z_std, t_std = _std_atmosphere(float(p))
        a, b = _wind_factor(float(p)), _temperature_factor(float(p))
        atmos["geopotential"].append(GRAVITY * (z_std + a * eta))
        atmos["u_component_of_wind"].append(a * u)
        atmos["v_component_of_wind"].append(a * v)
        atmos["temperature"].append(t_std + b * (t_col - STD_T0))
        atmos["specific_humidity"].append(q_surface * (p / 1000.0) ** Q_EXPONENT)
    surf32 = {n: np.asarray(x, dtype=np.float32) for n, x in surface.items()}
    atm32 = {n: np.stack(x, axis=1).astype(np.float32) for n, x in atmos.items()}
    return surf32, atm32


def _attrs(name: str) -> dict[str, str]:
    sp = VARIABLES[name]
    return {"units": sp.units, "long_name": sp.long_name}


def _dataset_attrs(config: WorldConfig, what: str) -> dict[str, Any]:
    return {
        "title": f"wpeft embedded world ({what}): synthetic shallow-water planet, not Earth",
        "synthetic": 1,
        "source": (
            "wpeft.data.world: forced rotating shallow-water equations on an Earth-sized sphere "
            f"(spectral T{config.truncation}, torch-harmonics ShallowWaterSolver transforms, "
            "semi-implicit AB3/Crank-Nicolson), Newtonian height relaxation to an equator-pole "
            "profile, stochastic mid-latitude vorticity stirring, Rayleigh drag, del^8 "
            "hyperdiffusion, synthetic continents and orography, a column water vapour tracer "
            "with evaporation and Clausius-Clapeyron condensation (precipitation). Pressure levels "
            "and surface fields are simple diagnostics of the single layer."
        ),
        "wpeft_world_config": json.dumps(config.to_dict(), sort_keys=True),
        "config_hash": config.hash(),
        "world_version": WORLD_VERSION,
    }


def _statics(model: WorldModel) -> dict[str, xr.DataArray]:
    dims = ("latitude", "longitude")
    soil_attrs = _attrs("soil_type") | {
        "flag_values": np.arange(model.config.n_soil_types + 1, dtype=np.int32),
        "comment": "0 = sea, 1..n = synthetic land soil types",
    }
    return {
        "land_sea_mask": xr.DataArray(model.lsm_out.astype(np.float32), dims=dims,
                                      attrs=_attrs("land_sea_mask")),
        "geopotential_at_surface": xr.DataArray(
            (GRAVITY * model.orog_out).astype(np.float32), dims=dims,
            attrs=_attrs("geopotential_at_surface"),
        ),
        "soil_type": xr.DataArray(model.soil_out.astype(np.float32), dims=dims, attrs=soil_attrs),
    }


def _coords(model: WorldModel) -> dict[str, xr.DataArray]:
    c = model.config
    return {
        "level": xr.DataArray(np.asarray(c.levels, dtype=np.int64), dims="level",
                              attrs={"units": "hPa", "long_name": "Pressure level"}),
        "latitude": xr.DataArray(model.lat_out, dims="latitude",
                                 attrs={"units": "degrees_north", "long_name": "Latitude"}),
        "longitude": xr.DataArray(model.lon_out, dims="longitude",
                                  attrs={"units": "degrees_east", "long_name": "Longitude"}),
    }


def _time_axis(steps: np.ndarray) -> np.ndarray:
    """datetime64[ns] times of 6-hourly step indices counted from START_TIME."""
    return START_TIME + np.asarray(steps, dtype=np.int64) * np.timedelta64(6 * 3600 * 10**9, "ns")


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------


class _Threads:
    """Set torch's intra-op threads inside generation and restore them afterwards."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        self.prev = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.prev)


def _generate_truth(
    config: WorldConfig, progress: bool
) -> tuple[xr.Dataset, dict[str, np.ndarray]]:
    """Run the truth: spin-up, then ``n_times`` 6-hourly outputs; keep the ensemble init states."""
    model = WorldModel(config)
    st = model.initial_state()
    init_idx = set(config.init_indices().tolist())
    init_spec: list[np.ndarray] = []
    frames: list[dict[str, np.ndarray]] = []
    n_windows = config.n_spinup + config.n_times - 1
    with tqdm(total=n_windows, desc="embedded world: truth (6 h steps)", unit="step",
              disable=not progress) as bar:
        for _ in range(config.n_spinup):
            model.advance(st)
            bar.update()
        for i in range(config.n_times):
            if i > 0:
                model.advance(st)
                bar.update()
            if not torch.isfinite(st.spec).all():
                raise RuntimeError(
                    f"Embedded world blew up (non-finite state) at output step {i}; "
                    "lower dt_seconds or the forcing amplitudes."
                )
            frames.append(model.raw_output(st))
            if i in init_idx:
                init_spec.append(st.spec[0].numpy().copy())
    raw = {k: np.concatenate([f[k] for f in frames]) for k in frames[0]}
    surface, atmos = _derive(raw, model)
    dims_s = ("time", "latitude", "longitude")
    dims_a = ("time", "level", "latitude", "longitude")
    data = {n: xr.DataArray(x, dims=dims_s, attrs=_attrs(n)) for n, x in surface.items()}
    data |= {n: xr.DataArray(x, dims=dims_a, attrs=_attrs(n)) for n, x in atmos.items()}
    data |= _statics(model)
    coords = _coords(model) | {"time": ("time", _time_axis(np.arange(config.n_times)))}
    ds = xr.Dataset(data, coords=coords, attrs=_dataset_attrs(config, "truth"))
    ds = ds[list(_SURFACE) + list(_ATMOS) + list(_STATIC)]
    return ds, {"spec": np.stack(init_spec), "index": config.init_indices()}


def _generate_ensemble(
    config: WorldConfig, init: dict[str, np.ndarray], progress: bool
) -> xr.Dataset:
    """Run the ensemble forecasts from the saved truth states with the perturbed model.

    Forecasts are batched over init times and members, in fixed chunks of about
    ``_ENSEMBLE_BATCH`` states (cache friendly; the chunking depends only on the config, and each
    chunk has its own seed, so the output is deterministic).
    """
    model = WorldModel(config, perturbed=True)
    members = config.ensemble_members
    spec = torch.as_tensor(init["spec"])
    n = spec.shape[0]
    per_chunk = max(1, _ENSEMBLE_BATCH // members)
    chunks = [range(i, min(i + per_chunk, n)) for i in range(0, n, per_chunk)]
    seq = np.random.SeedSequence([config.seed, 3])
    seeds = [int(x >> np.uint64(1)) for x in seq.generate_state(len(chunks), dtype=np.uint64)]
    parts: list[dict[str, np.ndarray]] = []
    with tqdm(total=len(chunks) * config.lead_steps, desc="embedded world: ensemble (6 h steps)",
              unit="step", disable=not progress) as bar:
        for chunk, seed in zip(chunks, seeds):
            st = model.perturbed_states(spec[chunk.start:chunk.stop], members, seed)
            for _ in range(config.lead_steps):
                model.advance(st)
                bar.update()
            if not torch.isfinite(st.spec).all():
                raise RuntimeError("Embedded world ensemble blew up (non-finite state).")
            parts.append(model.raw_output(st))
    raw = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    surface, atmos = _derive(raw, model)

    def split(x: np.ndarray) -> np.ndarray:  # (N * M, ...) -> (N, M, ...)
        return x.reshape((n, members) + x.shape[1:])

    dims_s = ("time", "member", "latitude", "longitude")
    dims_a = ("time", "member", "level", "latitude", "longitude")
    data = {n_: xr.DataArray(split(x), dims=dims_s, attrs=_attrs(n_)) for n_, x in surface.items()}
    data |= {n_: xr.DataArray(split(x), dims=dims_a, attrs=_attrs(n_)) for n_, x in atmos.items()}
    data |= _statics(model)
    idx = np.asarray(init["index"])
    coords = _coords(model) | {
        "time": ("time", _time_axis(idx + config.lead_steps)),
        "init_time": ("time", _time_axis(idx)),
        "member": ("member", np.arange(members, dtype=np.int64)),
    }
    attrs = _dataset_attrs(config, "ensemble") | {"lead_hours": config.ensemble_lead_hours}
    ds = xr.Dataset(data, coords=coords, attrs=attrs)
    return ds[list(_SURFACE) + list(_ATMOS) + list(_STATIC)]


# --------------------------------------------------------------------------------------------
# caching
# --------------------------------------------------------------------------------------------


def _world_dir(config: WorldConfig, cache_dir: Path | None) -> Path:
    if cache_dir is None:
        from wpeft.paths import cache_dir as default_cache_dir

        cache_dir = default_cache_dir()
    return Path(cache_dir) / f"world-{config.hash()}"


def _write_atomic(target: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a fresh sibling temp directory, then rename it to ``target``.

    A crash leaves only a ``.tmp-*`` directory, never a ``target`` that looks complete. If another
    process finished the same target first, its copy wins and ours is discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _to_zarr(ds: xr.Dataset, path: Path) -> None:
    chunks = {"time": 64}
    encoding = {}
    for name, da in ds.data_vars.items():
        sizes = [min(chunks.get(str(d), da.sizes[d]), da.sizes[d]) for d in da.dims]
        encoding[str(name)] = {"chunks": tuple(sizes)}
    encoding["time"] = {"units": "hours since 2000-01-01 00:00:00", "dtype": "int64"}
    if "init_time" in ds.coords:
        encoding["init_time"] = {"units": "hours since 2000-01-01 00:00:00", "dtype": "int64"}
    ds.to_zarr(path, mode="w", encoding=encoding, zarr_format=2, consolidated=True)


def _open_zarr(path: Path) -> xr.Dataset:
    return xr.open_zarr(path, consolidated=True, zarr_format=2)


def _ensure_truth(config: WorldConfig, cache_dir: Path | None, progress: bool) -> Path:
    target = _world_dir(config, cache_dir) / "truth"
    if target.exists():
        return target

    def write(tmp: Path) -> None:
        with _Threads(1), torch.inference_mode():
            ds, init = _generate_truth(config, progress)
        _to_zarr(ds, tmp / "data.zarr")
        np.savez(tmp / "init_states.npz", **init)
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=1, sort_keys=True))

    _write_atomic(target, write)
    return target


def open_world(
    config: WorldConfig | None = None,
    *,
    resolution: Literal["fine", "coarse"] = "fine",
    cache_dir: Path | None = None,
    progress: bool = True,
) -> xr.Dataset:
    """The truth trajectory of the embedded world (spin-up discarded), generating it if needed.

    Args:
        config: World configuration (default :class:`WorldConfig()`).
        resolution: ``"fine"`` (``nlat x nlon``) or ``"coarse"`` (conservatively coarsened by
            ``config.coarse_factor``).
        cache_dir: Root of the cache (default :func:`wpeft.paths.cache_dir`).
        progress: Show a progress bar while generating.

    Returns:
        Dataset (lazy, dask-backed from the zarr cache) with surface ``(time, latitude,
        longitude)``, atmos ``(time, level, latitude, longitude)`` and static ``(latitude,
        longitude)`` variables named as in :mod:`wpeft.data.schema`.
    """
    config = WorldConfig() if config is None else config
    if not isinstance(config, WorldConfig):
        raise ConfigError(f"config must be a WorldConfig, got {type(config).__name__}.")
    if resolution not in ("fine", "coarse"):
        raise ConfigError(f"resolution={resolution!r} must be 'fine' or 'coarse'.")
    ds = _open_zarr(_ensure_truth(config, cache_dir, progress) / "data.zarr")
    if resolution == "coarse":
        ds = coarsen_conservative(ds, config.coarse_factor)
    return ds


def open_world_ensemble(
    config: WorldConfig | None = None,
    *,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> xr.Dataset:
    """Ensemble forecasts of the embedded world at the fine grid, generating them if needed.

    Members start from the truth at ``config.ensemble_inits`` init times with perturbed initial
    conditions and a perturbed model (see the module docstring), so the raw ensemble is biased and
    under-dispersive, like real ensembles.

    Returns:
        Dataset with surface ``(time, member, latitude, longitude)`` and atmos ``(time, member,
        level, latitude, longitude)`` variables plus the statics; ``time`` is the valid time
        (init + lead), with the ``init_time`` coordinate along ``time`` and the lead in
        ``attrs["lead_hours"]``. The truth at the same times is
        ``open_world(config).sel(time=ens.time)``.
    """
    config = WorldConfig() if config is None else config
    if not isinstance(config, WorldConfig):
        raise ConfigError(f"config must be a WorldConfig, got {type(config).__name__}.")
    truth = _ensure_truth(config, cache_dir, progress)
    target = truth.parent / "ensemble"
    if not target.exists():
        with np.load(truth / "init_states.npz") as f:
            init = {k: f[k] for k in f.files}

        def write(tmp: Path) -> None:
            with _Threads(1), torch.inference_mode():
                ds = _generate_ensemble(config, init, progress)
            _to_zarr(ds, tmp / "data.zarr")

        _write_atomic(target, write)
    return _open_zarr(target / "data.zarr")
