"""The climatology of ``residual="climate"`` Prithvi-WxC models (the released 2.3B): files in
the package's MERRA-2 layout read into the config's channel order, the forward adding the
prediction to the climatology of each sample's target time, and the errors.

A small climate config on the embedded world's 32 x 64 grid: surface ``2t``, ``msl`` and ``t`` at
850 and 500 hPa (V = 4 channels). Each file's value at channel c, latitude i, longitude j is
``100 doy + hour + 10 c + i / 100 + j / 10000``, so any mix-up of file, channel, level or grid
orientation shows in the numbers.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("PrithviWxC", reason='prithviwxc is not installed (pip install -e ".[prithvi]")')
xr = pytest.importorskip("xarray")

from wpeft.backbones.configs import PrithviConfig, get_config
from wpeft.backbones.prithvi_adapter import build_prithvi
from wpeft.data.batch import random_batch
from wpeft.data.climatology import Climatology, climatology_key
from wpeft.errors import ConfigError, DataError

CFG = PrithviConfig(
    name="prithvi-climate-test",
    surf_vars=("2t", "msl"),
    static_vars=("lsm",),
    atmos_vars=("t",),
    levels=(850, 500),
    grid=(32, 64),
    patch_size=4,
    mask_unit_size=(8, 16),
    embed_dim=32,
    n_heads=2,
    n_blocks_encoder=1,
    n_blocks_decoder=1,
    residual="climate",
)
#: The files hold three levels, in another order than the config's.
FILE_LEVELS = (1000.0, 500.0, 850.0)


def expected(doy: int, hour: int, channel: int, nlat: int = 32) -> np.ndarray:
    i, j = np.meshgrid(np.arange(nlat), np.arange(64), indexing="ij")
    return (100 * doy + hour + 10 * channel + i / 100 + j / 10000).astype(np.float32)


def write_pair(
    root: Path, doy: int, hour: int, *, nlat: int = 32, skip: str | None = None,
    offset: float = 0.0,
) -> None:
    """``climate_surface_doyDOY_hourHH.nc`` and ``climate_vertical_...`` as MERRA-2 lays them out:
    surface ``(lat, lon)``, vertical ``(lev, lat, lon)`` with a ``lev`` coordinate; channel c of
    the config holds ``expected(doy, hour, c) + offset`` (t at 1000 hPa, not in the config: -1)."""
    dims = ("lat", "lon")
    surface = {
        v: (dims, expected(doy, hour, c, nlat) + offset)
        for c, v in enumerate(CFG.surf_vars)
        if v != skip
    }
    xr.Dataset(surface).to_netcdf(root / f"climate_surface_doy{doy:03}_hour{hour:02}.nc")
    channel = {850.0: 2, 500.0: 3}
    t = np.stack(
        [expected(doy, hour, channel[lv], nlat) + offset if lv in channel
         else np.full((nlat, 64), -1.0)
         for lv in FILE_LEVELS]
    ).astype(np.float32)
    vertical = {} if skip == "t" else {"t": (("lev", *dims), t)}
    xr.Dataset(vertical, coords={"lev": list(FILE_LEVELS)}).to_netcdf(
        root / f"climate_vertical_doy{doy:03}_hour{hour:02}.nc"
    )


def batch_at(*times: datetime):
    b = random_batch(CFG.surf_vars, CFG.static_vars, CFG.atmos_vars, batch_size=len(times),
                     grid=CFG.grid, levels=CFG.levels)
    return dataclasses.replace(b, metadata=dataclasses.replace(b.metadata, time=tuple(times)))


def zero_head_model():
    model = build_prithvi(CFG, seed=0)
    with torch.no_grad():
        model.prithvi.unembed.weight.zero_()
        model.prithvi.unembed.bias.zero_()
    return model


def test_files_are_read_in_the_configs_channel_order(tmp_path: Path) -> None:
    write_pair(tmp_path, 61, 0)
    clim = Climatology.for_config(CFG, tmp_path)
    assert clim.variables == CFG.variables == ("2t", "msl", "t_850", "t_500")
    out = clim.read(datetime(2001, 3, 2, 0))  # day 61 of 2001
    assert out.shape == (4, 32, 64) and out.dtype == torch.float32
    for c in range(4):
        assert torch.equal(out[c], torch.from_numpy(expected(61, 0, c)))
    # MERRA-2's 361 latitudes for a 360-row model: one latitude more is dropped (the last)
    write_pair(tmp_path, 62, 0, nlat=33)
    torch.testing.assert_close(clim.read(datetime(2001, 3, 3)), clim.read(datetime(2001, 3, 2)) + 100)


def test_day_of_year_is_capped_at_365_as_the_package_does() -> None:
    assert climatology_key(datetime(2001, 3, 2, 0)) == (61, 0)
    assert climatology_key(datetime(2004, 3, 1, 18)) == (61, 18)  # leap year: 1 March is day 61
    assert climatology_key(datetime(2004, 12, 31, 6)) == (365, 6)  # day 366 reads day 365
    assert climatology_key(datetime(2003, 12, 31, 6)) == (365, 6)


def test_zero_head_forward_is_the_climatology_of_each_target_time(tmp_path: Path) -> None:
    """``output = output_scalers * 0 + climate`` exactly; sample i reads the files of its own
    target time (last input + 6 h): 2001-03-01 18:00 -> day 61 hour 0; 2004-12-31 00:00 -> the
    leap day 366 capped to 365, hour 6."""
    write_pair(tmp_path, 61, 0)
    write_pair(tmp_path, 365, 6)
    model = zero_head_model()
    model.set_climatology(tmp_path)
    batch = batch_at(datetime(2001, 3, 1, 18), datetime(2004, 12, 31, 0))
    with torch.no_grad():
        out = model(batch)
    assert out.metadata.time == (datetime(2001, 3, 2, 0), datetime(2004, 12, 31, 6))
    for i, (doy, hour) in enumerate([(61, 0), (365, 6)]):
        for c, v in enumerate(CFG.surf_vars):
            assert torch.equal(out.surf_vars[v][i, 0], torch.from_numpy(expected(doy, hour, c)))
        for k in range(2):
            assert torch.equal(out.atmos_vars["t"][i, 0, k], torch.from_numpy(expected(doy, hour, 2 + k)))


def test_the_static_embedding_reads_the_climatology(tmp_path: Path) -> None:
    """With a live head, shifting the climatology by 1 moves the output by 1 plus what the
    network makes of the shifted climatology in its static embedding (not exactly 1)."""
    (tmp_path / "plus1").mkdir()
    write_pair(tmp_path, 61, 0)
    write_pair(tmp_path / "plus1", 61, 0, offset=1.0)
    model = build_prithvi(CFG, seed=0)
    batch = batch_at(datetime(2001, 3, 1, 18))

    def predict(directory: Path) -> torch.Tensor:
        model.set_climatology(directory)
        with torch.no_grad():
            return model(batch).surf_vars["2t"]

    delta = predict(tmp_path / "plus1") - predict(tmp_path)
    assert not torch.allclose(delta, torch.ones_like(delta), atol=1e-3)
    with torch.no_grad():  # the climate channels come last in the static embedding's input
        model.prithvi.patch_embedding_static.proj.weight[:, -4:].zero_()
    delta = predict(tmp_path / "plus1") - predict(tmp_path)
    torch.testing.assert_close(delta, torch.ones_like(delta))


def test_missing_file_variable_level_and_wrong_grid_are_named(tmp_path: Path) -> None:
    write_pair(tmp_path, 61, 0)
    clim = Climatology.for_config(CFG, tmp_path)
    with pytest.raises(DataError, match=r"climate_surface_doy062_hour06\.nc' does not exist"):
        clim.read(datetime(2001, 3, 3, 6))
    (tmp_path / "no_msl").mkdir()
    write_pair(tmp_path / "no_msl", 61, 0, skip="msl")
    with pytest.raises(DataError, match=r"lacks variable 'msl'; it has \['2t'\]"):
        Climatology.for_config(CFG, tmp_path / "no_msl").read(datetime(2001, 3, 2))
    (tmp_path / "no_t").mkdir()
    write_pair(tmp_path / "no_t", 61, 0, skip="t")
    with pytest.raises(DataError, match="climate_vertical_doy061_hour00.nc' lacks variable 't'"):
        Climatology.for_config(CFG, tmp_path / "no_t").read(datetime(2001, 3, 2))
    other_levels = dataclasses.replace(CFG, levels=(850, 700))
    with pytest.raises(DataError, match=r"lacks level 700 \(its 'lev': \['1000', '500', '850'\]\)"):
        Climatology.for_config(other_levels, tmp_path).read(datetime(2001, 3, 2))
    (tmp_path / "coarse").mkdir()
    write_pair(tmp_path / "coarse", 61, 0, nlat=16)
    with pytest.raises(DataError, match=r"'2t' .* is on a 16 x 64 grid; the model takes 32 x 64"):
        Climatology.for_config(CFG, tmp_path / "coarse").read(datetime(2001, 3, 2))
    with pytest.raises(DataError, match="Climatology directory .*missing' does not exist"):
        Climatology.for_config(CFG, tmp_path / "missing")


def test_models_refuse_a_missing_or_mismatched_climatology(tmp_path: Path) -> None:
    model = zero_head_model()
    with pytest.raises(ConfigError, match=r"residual='climate'\) and has none: call "
                       r"model\.set_climatology\(DIR\)"):
        model(batch_at(datetime(2001, 3, 1, 18)))
    other = Climatology.for_config(dataclasses.replace(CFG, atmos_vars=("q",)), tmp_path)
    with pytest.raises(ConfigError, match="does not match backbone 'prithvi-climate-test'"):
        model.set_climatology(other)
    with pytest.raises(ConfigError, match="residual='temporal' and reads no climatology"):
        build_prithvi("prithvi-tiny").set_climatology(tmp_path)
    model.set_climatology(Climatology.for_config(CFG, tmp_path))
    model.set_climatology(None)
    assert model.climatology is None


def test_released_config_channels(tmp_path: Path) -> None:
    """prithvi-2.3b: 20 MERRA-2 surface variables, then 10 vertical ones at 14 model levels."""
    cfg = get_config("prithvi-2.3b")
    clim = Climatology.for_config(cfg, tmp_path)
    assert clim.variables == cfg.variables and len(clim.variables) == 20 + 10 * 14
    assert clim.variables[20] == "CLOUD_34" and clim.grid == (360, 576)
    assert clim.paths(datetime(2020, 1, 1, 3) + timedelta(hours=6))[1].name == (
        "climate_vertical_doy001_hour09.nc"
    )
