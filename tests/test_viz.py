"""wpeft.viz: every view renders headless from hand-made records; figures are checked as objects
(labels, titles, colour limits, panels, hatching), not pixels. Earth maps never touch the network.

The views build pyplot-free matplotlib Figures, so no backend needs selecting (Agg renders)."""

from __future__ import annotations

import socket
import warnings

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from matplotlib.collections import PolyQuadMesh, QuadMesh
from matplotlib.image import AxesImage

from wpeft import viz
from wpeft.errors import DataError
from wpeft.viz import maps, style

BLOCKS = ["encoder0.0", "encoder0.1", "decoder2.1", "other"]
TENSORS = ["qkv", "proj", "fc1", "fc2", "norm1", "norm2", "other"]
STEPS = [0, 10, 20, 30]
VARS = ["2m_temperature", "mean_sea_level_pressure", "z (static)", "temperature"]
LAT = np.linspace(87.1875, -87.1875, 16)  # cell-centred, decreasing (schema)
LON = np.arange(0.0, 360.0, 11.25)  # 32 points


# --------------------------------------------------------------------------- fixtures


def make_fisher(totals: bool = False) -> xr.Dataset:
    rng = np.random.default_rng(0)
    shape = (len(STEPS), len(BLOCKS), len(TENSORS))
    exists = np.ones(shape[1:], bool)
    exists[3, :6] = False  # "other" block: only "other" tensors
    exists[:3, 6] = False  # transformer blocks: no "other" tensor
    data = {}
    for name in ("density", "fisher_mass", "jaccard_previous", "jaccard_first", "union_density"):
        v = rng.uniform(0.001, 0.05 if name == "density" else 1.0, shape)
        data[name] = (("step", "block", "tensor"), np.where(exists, v, np.nan))
    data["jaccard_previous"][1][0] = np.nan  # no previous record at the first step
    img = rng.uniform(0, 1, (len(STEPS), 2, 8, 8))
    img[:, 1, 4:, :] = np.nan  # a small matrix: 4 x 8 used, NaN-padded
    data["mask_image"] = (("step", "matrix", "row", "col"), img)
    data["image_rows"] = (("matrix",), np.array([8, 4]))
    data["image_cols"] = (("matrix",), np.array([8, 8]))
    if totals:
        for name in ("jaccard_previous", "jaccard_first", "union_density"):
            data[f"total_{name}"] = (("step",), np.linspace(0.2, 0.8, len(STEPS)))
    return xr.Dataset(
        data,
        coords={"step": STEPS, "block": BLOCKS, "tensor": TENSORS,
                "matrix": ["encoder0.0/qkv", "decoder2.1/fc1"], "row": np.arange(8),
                "col": np.arange(8)},
    )


def make_attention(with_step: bool = False) -> xr.Dataset:
    rng = np.random.default_rng(1)
    blocks = ["encoder0.0", "decoder2.1"]
    vv = rng.uniform(0, 1, (2, len(VARS), len(VARS)))
    vv /= vv.sum(-1, keepdims=True)
    vp = rng.uniform(0, 1, (2, len(VARS), 2, 4, 4))
    pm = rng.uniform(0, 0.3, (2, 3, LAT.size, LON.size))
    ds = xr.Dataset(
        {
            "external_var_var": (("block", "variable_q", "variable_k"), vv),
            "external_var_patch": (("block", "variable", "t", "ph", "pw"), vp / vp.sum()),
            "prompt_map": (("block", "prompt", "latitude", "longitude"), pm),
        },
        coords={"block": blocks, "variable_q": VARS, "variable_k": VARS, "variable": VARS,
                "prompt": [0, 1, 2], "latitude": LAT, "longitude": LON},
    )
    if with_step:
        ds = xr.concat([ds, ds * 0.5], dim=pd.Index([100, 200], name="step"))
    return ds


def make_skill(lat=LAT, lon=LON, seed=2):
    rng = np.random.default_rng(seed)
    grid = {"latitude": lat, "longitude": lon}
    shape = (len(lat), len(lon))
    attrs = {"units": "K", "long_name": "RMSE of 2 metre temperature"}
    a = xr.DataArray(rng.uniform(0.5, 2.0, shape), coords=grid, dims=list(grid),
                     name="2m_temperature_rmse", attrs=attrs)
    b = xr.DataArray(rng.uniform(0.8, 3.0, shape), coords=grid, dims=list(grid),
                     name="2m_temperature_rmse", attrs=attrs)
    sig = rng.uniform(size=shape) > 0.4
    diff = xr.Dataset({"difference": a - b, "significant": (list(grid), sig)}, coords=grid)
    return a, b, diff


@pytest.fixture()
def no_network(monkeypatch):
    """Any socket connection or cartopy download fails the test."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    try:
        import cartopy
    except ImportError:
        return attempts

    class NoDownloads(dict):
        def get(self, key, default=None):
            return refuse("cartopy downloader", key)

        __getitem__ = get

    monkeypatch.setitem(cartopy.config, "downloaders", NoDownloads())
    # wpeft.viz.maps may point this at the local data: restore it after the test.
    monkeypatch.setitem(cartopy.config, "pre_existing_data_dir",
                        cartopy.config["pre_existing_data_dir"])
    return attempts


@pytest.fixture()
def earth_data(monkeypatch):
    """Skip unless cartopy and the Debian coastline data are available."""
    pytest.importorskip("cartopy", reason="cartopy is not installed (pip install 'wpeft[viz]')")
    monkeypatch.delenv(maps.COASTLINE_ENV, raising=False)
    if not (maps.DEBIAN_CARTOPY_DATA / "shapefiles/gshhs/c/GSHHS_c_L1.shp").is_file():
        pytest.skip("Debian package python-cartopy-data (GSHHS coastlines) is not installed")


def render(fig, tmp_path, name="fig"):
    for suffix in (".png", ".pdf"):
        out = viz.save_figure(fig, tmp_path / f"{name}{suffix}", dpi=40)
        assert out.stat().st_size > 0


def colorbar_axes(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def colorbar_labels(fig):
    out = []
    for ax in colorbar_axes(fig):
        out += [ax.get_xlabel(), ax.get_ylabel()]
    return [x for x in out if x]


def meshes(ax):
    return [c for c in ax.collections if isinstance(c, QuadMesh)]


# --------------------------------------------------------------------------- style


def test_units_and_labels_from_attrs_then_schema():
    assert style.pretty_units("m s-1") == "m s⁻¹"
    assert style.pretty_units("m2 s-2") == "m² s⁻²"
    assert style.pretty_units("1") == ""
    assert style.colorbar_label("2m_temperature") == "2 metre temperature (K)"
    assert style.colorbar_label("10m_u_component_of_wind_rmse") == "RMSE of 10 metre U wind (m s⁻¹)"
    assert style.colorbar_label("temperature_850_bias") == "bias of temperature at 850 hPa (K)"
    assert style.colorbar_label("2t") == "2 metre temperature (K)"
    da = xr.DataArray([1.0], name="2m_temperature", attrs={"long_name": "T2m", "units": "degC"})
    assert style.colorbar_label(da) == "T2m (degC)"
    assert style.colorbar_label("mystery") == "mystery"


def test_save_figure_formats_size_and_bad_suffix(tmp_path):
    fig = viz.plot_budget_vs_skill(_runs())
    for suffix, magic in ((".png", b"\x89PNG"), (".pdf", b"%PDF"), (".svg", b"<?xml")):
        path = viz.save_figure(fig, tmp_path / "sub" / f"f{suffix}", dpi=30, size=(3, 2))
        assert path.read_bytes()[:5].startswith(magic)
    assert tuple(fig.get_size_inches()) == (3, 2)
    with pytest.raises(DataError, match="png"):
        viz.save_figure(fig, tmp_path / "f.jpg")


def test_display_longitudes_rolls_regional_grids_across_zero():
    lon = np.concatenate([np.arange(0.0, 2.6, 0.5), np.arange(350.0, 360.0, 0.5)])
    da = xr.DataArray(np.arange(lon.size, dtype=float), coords={"longitude": lon}, dims="longitude")
    out = maps.display_longitudes(da)
    assert out.longitude.values[0] == -10.0 and out.longitude.values[-1] == 2.5
    assert np.all(np.diff(out.longitude.values) > 0)
    assert float(out.sel(longitude=-10.0)) == float(da.sel(longitude=350.0))
    glob = xr.DataArray(np.zeros(LON.size), coords={"longitude": LON}, dims="longitude")
    np.testing.assert_array_equal(maps.display_longitudes(glob).longitude, LON)
    east = xr.DataArray(np.zeros(5), coords={"longitude": [10.0, 11, 12, 13, 14]}, dims="longitude")
    np.testing.assert_array_equal(maps.display_longitudes(east).longitude, [10, 11, 12, 13, 14])


def test_coastline_cleaning_drops_antimeridian_and_pole_edges():
    ring = np.array([[170.0, -70], [180, -75], [180, -90], [0, -90], [-180, -90], [-180, -75],
                     [-170, -70], [-175, -60]])
    runs = maps._real_coast(ring)
    assert [r.tolist() for r in runs] == [[[170.0, -70], [180, -75]],
                                          [[-180, -75], [-170, -70], [-175, -60]]]
    seam = np.array([[179.0, 60], [180, 60], [180, 65], [179, 66]])
    assert [len(r) for r in maps._real_coast(seam)] == [2, 2]


# --------------------------------------------------------------------------- Fisher masks


def test_mask_heatmap_mean_over_tensors_and_single_tensor(tmp_path):
    fisher = make_fisher()
    fig = viz.plot_mask_heatmap(fisher, "density")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "training step" and ax.get_ylabel() == "block"
    assert [t.get_text() for t in ax.get_yticklabels()] == BLOCKS
    assert "mean over tensor kinds" in ax.get_title()
    assert colorbar_labels(fig) == ["mask density (fraction of entries selected)"]
    (mesh,) = meshes(ax)
    values = mesh.get_array().reshape(len(BLOCKS), len(STEPS))
    expected = np.nanmean(fisher.density.values, axis=2).T
    np.testing.assert_allclose(values, expected)
    assert mesh.get_clim()[0] == 0.0
    render(fig, tmp_path)

    fig = viz.plot_mask_heatmap(fisher, "jaccard_first", tensor="qkv")
    (mesh,) = meshes(fig.axes[0])
    assert mesh.get_clim() == (0.0, 1.0)
    values = mesh.get_array().reshape(len(BLOCKS), len(STEPS))
    assert values.mask[3].all()  # the "other" block has no qkv
    assert "qkv tensors" in fig.axes[0].get_title()
    fig = viz.plot_mask_heatmap(fisher, "fisher_mass")
    values = meshes(fig.axes[0])[0].get_array().reshape(len(BLOCKS), len(STEPS))
    np.testing.assert_allclose(values, np.nansum(fisher.fisher_mass.values, axis=2).T)
    with pytest.raises(DataError, match="tensor kind"):
        viz.plot_mask_heatmap(fisher, tensor="mlp")
    with pytest.raises(DataError, match="no 'selected'"):
        viz.plot_mask_heatmap(fisher, "selected")


def test_mask_layers_one_step_with_limits_shared_by_all_steps(tmp_path):
    fisher = make_fisher()
    fig = viz.plot_mask_layers(fisher, "density", step=10)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "tensor kind" and ax.get_ylabel() == "block"
    assert [t.get_text() for t in ax.get_yticklabels()] == BLOCKS
    assert [t.get_text() for t in ax.get_xticklabels()] == TENSORS
    assert "at step 10" in ax.get_title()
    assert colorbar_labels(fig) == ["mask density (fraction of entries selected)"]
    (mesh,) = meshes(ax)
    values = mesh.get_array().reshape(len(BLOCKS), len(TENSORS))
    expected = fisher.density.sel(step=10).values
    np.testing.assert_allclose(values.filled(np.nan), expected)
    assert values.mask[3, :6].all() and not values.mask[3, 6]  # "other" block: only "other"
    # colour limits cover every step, so the frames of a step slider compare
    assert mesh.get_clim() == (0.0, float(np.nanmax(fisher.density.values)))
    render(fig, tmp_path)
    assert "at step 30" in viz.plot_mask_layers(fisher).axes[0].get_title()  # default: last
    (mesh,) = meshes(viz.plot_mask_layers(fisher, "jaccard_first", step=0).axes[0])
    assert mesh.get_clim() == (0.0, 1.0)
    # a tensor kind without data at any step is left out
    sparse = fisher.assign(density=fisher.density.where(fisher.tensor != "norm2"))
    fig = viz.plot_mask_layers(sparse, "density")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [
        t for t in TENSORS if t != "norm2"
    ]
    with pytest.raises(DataError, match="recorded steps"):
        viz.plot_mask_layers(fisher, step=5)
    with pytest.raises(DataError, match="not a per-"):
        viz.plot_mask_layers(fisher.assign(total_density=("step", np.ones(4))), "total_density")

def test_mask_image_crops_padding_and_uses_unit_range(tmp_path):
    fisher = make_fisher()
    fig = viz.plot_mask_image(fisher, "decoder2.1/fc1", step=20)
    ax = fig.axes[0]
    (im,) = [a for a in ax.get_images() if isinstance(a, AxesImage)]
    assert im.get_clim() == (0.0, 1.0)
    assert im.get_array().shape == (4, 8)  # NaN padding dropped
    assert ax.get_title() == "decoder2.1/fc1 mask at step 20"
    assert "rows" in ax.get_ylabel() and "columns" in ax.get_xlabel()
    assert colorbar_labels(fig) == ["local mask density (fraction selected)"]
    render(fig, tmp_path)
    assert "step 30" in viz.plot_mask_image(fisher, "encoder0.0/qkv").axes[0].get_title()
    with pytest.raises(DataError, match="recorded steps"):
        viz.plot_mask_image(fisher, "encoder0.0/qkv", step=5)
    with pytest.raises(DataError, match="Unknown matrix"):
        viz.plot_mask_image(fisher, "encoder9.9/qkv")


def test_overlap_curves_blocks_and_backbone_totals(tmp_path):
    fisher = make_fisher()
    fig = viz.plot_overlap_curves(fisher, blocks=["encoder0.0", "decoder2.1"])
    top, bottom = fig.axes
    assert top.get_ylabel() == "Jaccard overlap" and top.get_ylim() == (0.0, 1.02)
    assert bottom.get_xlabel() == "training step" and bottom.get_ylabel() == "union density"
    assert len(top.lines) == 4 and len(bottom.lines) == 2  # (prev, first) x 2 blocks; union x 2
    legend = {t.get_text() for t in top.get_legend().get_texts()}
    assert legend == {"vs previous mask", "vs first mask"}
    assert [t.get_text() for t in bottom.get_legend().get_texts()] == ["encoder0.0", "decoder2.1"]
    render(fig, tmp_path)

    fig = viz.plot_overlap_curves(make_fisher(totals=True))
    np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(), np.linspace(0.2, 0.8, 4))
    fig = viz.plot_overlap_curves(fisher)  # no totals: mean over blocks
    assert len(fig.axes[0].lines) == 2
    with pytest.raises(DataError, match="Unknown block"):
        viz.plot_overlap_curves(fisher, blocks=["encoder7.0"])


# --------------------------------------------------------------------------- prompt attention


def test_variable_attention_heatmap(tmp_path):
    att = make_attention()
    fig = viz.plot_variable_attention(att, "decoder2.1")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "key variable" and ax.get_ylabel() == "query variable"
    assert [t.get_text() for t in ax.get_xticklabels()] == VARS
    assert [t.get_text() for t in ax.get_yticklabels()] == VARS
    assert "block decoder2.1" in ax.get_title()
    assert len(ax.texts) == len(VARS) ** 2  # annotated cells
    assert colorbar_labels(fig) == ["attention weight"]
    np.testing.assert_allclose(ax.get_images()[0].get_array(),
                               att.external_var_var.sel(block="decoder2.1").values)
    render(fig, tmp_path)
    with pytest.raises(DataError, match="Unknown block"):
        viz.plot_variable_attention(att, "encoder5.5")


def test_attention_records_with_step_dim_default_to_last_step():
    att = make_attention(with_step=True)
    fig = viz.plot_variable_attention(att, "encoder0.0")
    assert "step 200" in fig.axes[0].get_title()
    np.testing.assert_allclose(fig.axes[0].get_images()[0].get_array(),
                               att.external_var_var.sel(step=200, block="encoder0.0").values)
    fig = viz.plot_prompt_map(att, "encoder0.0", 1, step=100)
    assert "step 100" in fig.axes[0].get_title()
    with pytest.raises(DataError, match="recorded steps"):
        viz.plot_patch_attention(att, "encoder0.0", step=7)


def test_patch_attention_flat_and_per_variable_panels(tmp_path):
    att = make_attention()
    fig = viz.plot_patch_attention(att, "encoder0.0")
    (ax,) = [a for a in fig.axes if a not in colorbar_axes(fig)]
    assert ax.get_images()[0].get_array().shape == (len(VARS), 2 * 4 * 4)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["t=0", "t=1"]
    assert "patch position" in ax.get_xlabel() and ax.get_ylabel() == "variable"
    render(fig, tmp_path, "flat")

    fig = viz.plot_patch_attention(att, "encoder0.0", variable=["2m_temperature", "temperature"])
    panels = [a for a in fig.axes if a not in colorbar_axes(fig)]
    assert len(panels) == 4  # 2 variables x 2 time steps
    assert {p.get_images()[0].get_clim() for p in panels} == {panels[0].get_images()[0].get_clim()}
    assert panels[1].get_title() == "2m_temperature, t=1"
    assert panels[0].get_images()[0].get_array().shape == (4, 4)
    assert colorbar_labels(fig) == ["attention weight"]
    render(fig, tmp_path, "panels")
    assert len(viz.plot_patch_attention(att, "encoder0.0", variable="temperature").axes) == 3
    with pytest.raises(DataError, match="Unknown variable"):
        viz.plot_patch_attention(att, "encoder0.0", variable="2t")


def test_prompt_map_synthetic_world_has_no_coastlines(tmp_path, no_network):
    fig = viz.plot_prompt_map(make_attention(), "encoder0.0", 2, earth=False)
    ax = fig.axes[0]
    assert "synthetic world" in ax.get_xlabel() and ax.get_ylabel() == "latitude (°N)"
    assert not hasattr(ax, "projection")  # plain axes, not cartopy
    assert len(ax.collections) == 1  # the field only: no coastline artists
    assert ax.get_title() == "attention paid to prompt 2, block encoder0.0"
    assert colorbar_labels(fig) == ["attention weight"]
    render(fig, tmp_path)
    assert no_network == []


def test_prompt_map_on_earth_uses_local_coastlines_offline(tmp_path, earth_data, no_network):
    from cartopy.mpl.feature_artist import FeatureArtist
    from cartopy.mpl.geoaxes import GeoAxes

    fig = viz.plot_prompt_map(make_attention(), "encoder0.0", 0, earth=True)
    ax = fig.axes[0]
    assert isinstance(ax, GeoAxes)
    assert any(isinstance(a, FeatureArtist) for a in ax.artists + ax.collections)
    render(fig, tmp_path)
    assert no_network == []


# --------------------------------------------------------------------------- skill


def test_skill_map_labels_and_limits(tmp_path, no_network):
    a, _, diff = make_skill()
    fig = viz.plot_skill_map(a, earth=False)
    ax = fig.axes[0]
    assert ax.get_title() == "RMSE of 2 metre temperature"
    assert colorbar_labels(fig) == ["RMSE of 2 metre temperature (K)"]
    (mesh,) = meshes(ax)
    assert mesh.get_cmap().name == "viridis"
    assert mesh.get_clim() == pytest.approx((float(a.min()), float(a.max())))
    render(fig, tmp_path)

    fig = viz.plot_skill_map(a.to_dataset(), earth=False, title="T2m", vmin=0, vmax=5)
    assert fig.axes[0].get_title() == "T2m" and meshes(fig.axes[0])[0].get_clim() == (0, 5)
    bias = diff.difference.rename("2m_temperature_bias")
    bias.attrs = {}  # no attrs: labels from the schema
    fig = viz.plot_skill_map(bias, earth=False)
    (mesh,) = meshes(fig.axes[0])
    lo, hi = mesh.get_clim()
    assert lo == -hi and hi == pytest.approx(float(abs(bias).max()))
    assert mesh.get_cmap().name == "RdBu_r"
    assert colorbar_labels(fig) == ["bias of 2 metre temperature (K)"]
    with pytest.raises(DataError, match="variable="):
        viz.plot_skill_map(xr.Dataset({"x": a, "y": a}), earth=False)
    with pytest.raises(DataError, match="extra dims"):
        viz.plot_skill_map(a.expand_dims(time=2), earth=False)


def _panels(fig):
    return {ax.get_label(): ax for ax in fig.axes if ax.get_label() in ("a", "b", "difference")}


def test_skill_comparison_three_panels_shared_limits_and_hatching(tmp_path, no_network):
    a, b, diff = make_skill()
    fig = viz.plot_skill_comparison(a, b, diff, earth=False)
    p = _panels(fig)
    assert len(p) == 3
    assert [p[k].get_title() for k in ("a", "b", "difference")] == [
        "WeatherPEFT", "Full-Tuning", "WeatherPEFT − Full-Tuning"]
    clim_a, clim_b = meshes(p["a"])[0].get_clim(), meshes(p["b"])[0].get_clim()
    assert clim_a == clim_b == pytest.approx(
        (min(float(a.min()), float(b.min())), max(float(a.max()), float(b.max()))))
    dmesh = meshes(p["difference"])[0]
    lo, hi = dmesh.get_clim()
    assert lo == -hi and hi == pytest.approx(float(abs(diff.difference).max()))
    assert dmesh.get_cmap().name == "RdBu_r"
    hatches = [c for c in p["difference"].collections if isinstance(c, PolyQuadMesh)]
    assert len(hatches) == 1 and hatches[0].get_hatch() == "///"
    n_hatched = int((~hatches[0].get_array().mask).sum())
    assert n_hatched == int((~diff.significant).sum())
    assert p["difference"].get_legend().get_texts()[0].get_text() == "not significant"
    # a difference from wpeft.runs.skill_difference names its test in the legend
    named = diff.copy()
    named["significant"].attrs["long_name"] = "paired t-test with AR(1) effective sample size, p < 0.05"
    legend = _panels(viz.plot_skill_comparison(a, b, named, earth=False))["difference"].get_legend()
    assert " ".join(legend.get_texts()[0].get_text().split()) == (
        "not significant (paired t-test with AR(1) effective sample size, p < 0.05)")
    assert sorted(colorbar_labels(fig)) == ["RMSE of 2 metre temperature (K)",
                                           "Δ RMSE of 2 metre temperature (K)"]
    assert fig.get_suptitle() == "RMSE of 2 metre temperature (K)"
    render(fig, tmp_path)

    all_sig = diff.assign(significant=diff.significant | True)
    fig = viz.plot_skill_comparison(a, b, all_sig, labels=("A", "B"), earth=False)
    assert not any(isinstance(c, PolyQuadMesh) for c in _panels(fig)["difference"].collections)
    fig = viz.plot_skill_comparison(a, b, earth=False)  # difference computed, no hatching
    np.testing.assert_allclose(meshes(_panels(fig)["difference"])[0].get_array().ravel(),
                               (a - b).values.ravel())
    with pytest.raises(DataError, match="grid"):
        viz.plot_skill_comparison(a, b.isel(longitude=slice(1, None)), earth=False)


def test_skill_comparison_picks_variable_of_skill_difference():
    a, b, diff = make_skill()
    stacked = xr.concat([diff, diff * 0 + diff.assign(difference=-diff.difference)],
                        dim=pd.Index(["2m_temperature", "other"], name="variable"))
    stacked["significant"] = stacked.significant.astype(bool)
    # as wpeft.runs.skill_difference: base names; picked by a's name without "_rmse"
    fig = viz.plot_skill_comparison(a, b, stacked, earth=False)
    np.testing.assert_allclose(meshes(_panels(fig)["difference"])[0].get_array().ravel(),
                               diff.difference.values.ravel())
    with pytest.raises(DataError, match="variable="):
        viz.plot_skill_comparison(a.rename("x"), b.rename("x"), stacked, earth=False)


def test_skill_comparison_on_earth_regional_grid_across_greenwich(tmp_path, earth_data, no_network):
    from cartopy.mpl.geoaxes import GeoAxes

    lon = np.concatenate([np.arange(0.0, 2.6, 0.5), np.arange(350.0, 360.0, 0.5)])
    a, b, diff = make_skill(lat=np.arange(60.0, 49.9, -0.5), lon=lon)
    fig = viz.plot_skill_comparison(a, b, diff, earth=True)
    p = _panels(fig)
    assert all(isinstance(ax, GeoAxes) for ax in p.values())
    x0, x1, _, _ = p["a"].get_extent()
    assert x0 == pytest.approx(-10.25) and x1 == pytest.approx(2.75)
    assert any(isinstance(c, PolyQuadMesh) and c.get_hatch() for c in p["difference"].collections)
    render(fig, tmp_path)
    assert no_network == []


def test_earth_map_without_local_data_warns_and_renders(tmp_path, monkeypatch, no_network):
    pytest.importorskip("cartopy", reason="cartopy is not installed")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(maps.COASTLINE_ENV, str(empty))
    a, _, _ = make_skill()
    with pytest.warns(UserWarning, match="without coastlines"):
        fig = viz.plot_skill_map(a, earth=True)
    assert maps.find_coastlines() is None
    render(fig, tmp_path)
    assert no_network == []


def _runs() -> pd.DataFrame:
    return pd.DataFrame({
        "method": ["WeatherPEFT", "WeatherPEFT", "WeatherPEFT", "LoRA", "LoRA", "Full-Tuning"],
        "budget_percent": [0.1, 0.3, 0.3, 0.3, 1.0, 100.0],
        "score": [1.10, 1.00, 1.02, 1.05, 1.01, 0.98],
    })


def test_budget_vs_skill(tmp_path):
    fig = viz.plot_budget_vs_skill(_runs(), score_label="RMSE 2 m temperature (K)",
                                   lower_is_better=True)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel() == "trainable parameters (% of backbone)"
    assert ax.get_ylabel() == "RMSE 2 m temperature (K) (lower is better)"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["WeatherPEFT", "LoRA", "Full-Tuning"]
    markers = [ln for ln in ax.lines if ln.get_linestyle() == "None"]
    assert len({ln.get_marker() for ln in markers}) == 3
    assert len({ln.get_color() for ln in markers}) == 3
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [1.10, 1.01])  # mean over seeds
    render(fig, tmp_path)

    runs = _runs().rename(columns={"score": "2m_temperature_rmse"})
    runs["budget_fraction"] = runs.pop("budget_percent") / 100
    fig = viz.plot_budget_vs_skill(runs, score="2m_temperature_rmse")
    assert fig.axes[0].get_ylabel() == "RMSE of 2 metre temperature (K)"
    np.testing.assert_allclose(fig.axes[0].lines[-1].get_xdata(), [100.0])
    ds = xr.Dataset.from_dataframe(_runs().rename_axis("run"))
    ds["score"].attrs["long_name"] = "CRPS"
    assert viz.plot_budget_vs_skill(ds).axes[0].get_ylabel() == "CRPS"
    with pytest.raises(DataError, match="> 0"):
        viz.plot_budget_vs_skill(_runs().assign(budget_percent=0.0))
    with pytest.raises(DataError, match="lacks"):
        viz.plot_budget_vs_skill(_runs().drop(columns="score"))


def test_budget_table_takes_the_size_for_its_x() -> None:
    from wpeft.viz.skill import budget_table

    runs = pd.DataFrame({
        "method": ["sfas", "lora"], "score": [1.0, 2.0],
        "budget_fraction": [0.04, 0.01], "changed_fraction": [0.8, 0.01],
        "adapter_fraction": [0.12, 0.04],
    })
    assert budget_table(runs)["budget_percent"].tolist() == [4.0, 1.0]
    assert budget_table(runs, size="changed_fraction")["budget_percent"].tolist() == [80.0, 1.0]
    assert budget_table(runs, size="adapter_fraction")["budget_percent"].tolist() == [12.0, 4.0]
    with pytest.raises(DataError, match="Unknown size 'adapter_bytes'"):
        budget_table(runs, size="adapter_bytes")
    with pytest.raises(DataError, match="lacks column 'changed_fraction'"):
        budget_table(runs.drop(columns="changed_fraction"), size="changed_fraction")


# --------------------------------------------------------------------------- HoloViews


@pytest.fixture(scope="module")
def hv():
    return pytest.importorskip("holoviews", reason="holoviews is not installed")


def _dims(el):
    return [d.name for d in el.kdims], [d.name for d in el.vdims]


def test_hv_fisher_views(hv):
    fisher = make_fisher()
    heat = viz.hv_mask_heatmap(fisher, "density")
    assert isinstance(heat, hv.HeatMap)
    assert _dims(heat) == (["step", "block"], ["density"])
    lo, hi = heat.range("density")
    assert lo == 0.0 and hi == pytest.approx(np.nanmax(np.nanmean(fisher.density, axis=2)))
    assert viz.hv_mask_heatmap(fisher, "jaccard_first", "qkv").range("jaccard_first") == (0, 1)

    img = viz.hv_mask_image(fisher, "decoder2.1/fc1", step=10)
    assert isinstance(img, hv.Image) and _dims(img) == (["col", "row"], ["mask_density"])
    assert img.range("mask_density") == (0.0, 1.0) and img.dimension_values(2).size == 4 * 8
    hmap = viz.hv_mask_image(fisher, "encoder0.0/qkv")
    assert isinstance(hmap, hv.HoloMap) and list(hmap.keys()) == STEPS

    layout = viz.hv_overlap_curves(fisher, blocks=["encoder0.1"])
    top, bottom = layout
    assert len(top) == 2 and len(bottom) == 1
    assert all(isinstance(c, hv.Curve) for c in top)
    curve = top.values()[0]
    assert _dims(curve) == (["step"], ["jaccard"]) and curve.range("jaccard") == (0.0, 1.0)


def test_hv_attention_views(hv):
    att = make_attention(with_step=True)
    heat = viz.hv_variable_attention(att, "encoder0.0")
    assert _dims(heat) == (["variable_k", "variable_q"], ["attention"])
    assert heat.range("attention")[1] == pytest.approx(
        float(att.external_var_var.sel(step=200, block="encoder0.0").max()))
    flat = viz.hv_patch_attention(att, "encoder0.0")
    assert _dims(flat) == (["position", "variable"], ["attention"])
    assert len(flat) == len(VARS) * 32
    panels = viz.hv_patch_attention(att, "encoder0.0", variable=["temperature", "2m_temperature"])
    assert isinstance(panels, hv.Layout) and len(panels) == 4
    assert len({p.range("attention") for p in panels}) == 1
    img = viz.hv_prompt_map(att, "decoder2.1", 1, step=100)
    assert isinstance(img, hv.Image)
    assert _dims(img) == (["longitude", "latitude"], ["attention"])
    expected = att.prompt_map.sel(step=100, block="decoder2.1", prompt=1)
    assert img.range("attention")[1] == pytest.approx(float(expected.max()))


def test_hv_skill_views(hv, tmp_path):
    a, b, diff = make_skill()
    img = viz.hv_skill_map(a)
    assert isinstance(img, hv.Image)
    assert _dims(img) == (["longitude", "latitude"], ["2m_temperature_rmse"])
    vdim = img.vdims[0]
    assert vdim.label == "RMSE of 2 metre temperature" and vdim.unit == "K"
    assert img.range(vdim) == pytest.approx((float(a.min()), float(a.max())))

    layout = viz.hv_skill_comparison(a, b, diff)
    assert isinstance(layout, hv.Layout) and len(layout) == 3
    ia, ib, overlay = layout
    assert ia.range(ia.vdims[0]) == ib.range(ib.vdims[0])
    dimg, pts = overlay
    lo, hi = dimg.range(dimg.vdims[0])
    assert lo == -hi and hi == pytest.approx(float(abs(diff.difference).max()))
    assert isinstance(pts, hv.Points) and len(pts) == int((~diff.significant).sum())
    assert pts.label == "not significant"
    named = diff.copy()
    named["significant"].attrs["long_name"] = "paired t-test, p < 0.05"
    _, _, (_, named_pts) = viz.hv_skill_comparison(a, b, named)
    assert named_pts.label == "not significant (paired t-test, p < 0.05)"

    scat = viz.hv_budget_vs_skill(_runs())
    scatters = [el for el in scat if isinstance(el, hv.Scatter)]
    assert [s.label for s in scatters] == ["WeatherPEFT", "LoRA", "Full-Tuning"]
    assert _dims(scatters[0]) == (["budget_percent"], ["score"])
    assert scat.range("budget_percent") == (0.1, 100.0)
    # renders to a bokeh model (no browser)
    from bokeh.io import save
    from bokeh.resources import INLINE

    save(hv.render(layout, backend="bokeh"), tmp_path / "cmp.html", resources=INLINE, title="x")
    save(hv.render(scat, backend="bokeh"), tmp_path / "budget.html", resources=INLINE, title="x")


def test_hv_earth_map_overlays_local_coastlines(hv, earth_data, no_network):
    a, _, _ = make_skill()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        overlay = viz.hv_skill_map(a, earth=True)
    assert not [w for w in caught if "coastlines" in str(w.message)]  # local data was found
    img, coast = overlay
    assert isinstance(img, hv.Image) and isinstance(coast, hv.Path)
    xy = coast.array()
    assert np.isnan(xy[:, 0]).sum() > 100  # many coastline pieces, NaN-separated
    lon0, lon1 = coast.range("longitude")
    assert lon0 >= -5.625 - 1e-9 and lon1 > 300  # in the grid's 0..360 frame, Americas included
    assert no_network == []


def test_grib_reader_and_cartopy_share_a_process_cleanly() -> None:
    """eccodes and pyproj bundle different PROJ builds; importing wpeft first keeps exit clean."""
    import subprocess
    import sys

    pytest.importorskip("eccodes")
    pytest.importorskip("cartopy")
    code = "import wpeft, eccodes, cartopy.crs as c; c.PlateCarree()"
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=120).returncode == 0


def test_hv_mask_heatmap_has_one_column_per_record(hv):
    fisher = make_fisher().assign_coords(step=[0, 10, 20, 25])  # last record off the interval
    heat = viz.hv_mask_heatmap(fisher, "density")
    assert list(dict.fromkeys(heat.dimension_values("step"))) == ["0", "10", "20", "25"]
    plot = hv.renderer("bokeh").get_plot(heat)
    assert list(plot.state.x_range.factors) == ["0", "10", "20", "25"]  # equal-width columns


def test_hv_skill_comparison_of_signed_fields_is_diverging(hv):
    a, b, diff = make_skill()
    bias_a, bias_b = (a - 1.2).rename("2m_temperature_bias"), (b - 1.5).rename("2m_temperature_bias")
    ia, ib, _ = viz.hv_skill_comparison(bias_a, bias_b, diff)
    lo, hi = ia.range(ia.vdims[0])
    assert lo == -hi and ib.range(ib.vdims[0]) == (lo, hi)
    assert ia.opts.get().kwargs["cmap"] == "RdBu_r"
    ra, _, _ = viz.hv_skill_comparison(a, b, diff)
    assert ra.opts.get().kwargs["cmap"] == "viridis"


def test_hv_budget_vs_skill_title_and_padding(hv):
    scat = viz.hv_budget_vs_skill(_runs(), title="downscaling: budget vs RMSE")
    opts = scat.opts.get().kwargs
    assert opts["title"] == "downscaling: budget vs RMSE" and opts["padding"] == 0.1
    plot = hv.renderer("bokeh").get_plot(scat)
    lo, hi = plot.state.x_range.start, plot.state.x_range.end
    assert lo < 0.1 and hi > 100.0  # the extreme runs are not drawn on the frame's edge
