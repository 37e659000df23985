"""Append-only records inside a run directory, and reading a run directory back.

Layout of a run directory (see :mod:`wpeft.training.loop`)::

    <run>/config.json            the TrainConfig
    <run>/metrics.jsonl          one JSON line per evaluation
    <run>/summary.json           written last: the run is finished
    <run>/fields.nc              test predictions and targets
    <run>/records/<kind>/        append-only records written during training (this module)
        index.json               the complete chunks, in step order
        step-00000010.nc         one netCDF chunk per recorded step

**Why a reader never sees a half-written record.** A chunk is written to ``<name>.tmp`` and
renamed with :func:`os.replace` (atomic on POSIX and Windows); only then is ``index.json``
rewritten the same way (write ``index.json.tmp``, rename). A reader opens ``index.json`` first
and then only the chunks it lists, so it sees every record complete or not at all, even while
training keeps appending; ``*.tmp`` files and chunks not yet in the index are ignored. One writer
per run directory is assumed (the training process).

Every chunk is an ordinary netCDF file (netCDF-3 for small frequent records, zlib netCDF-4 for
large ones) with CF-style ``units`` / ``long_name`` / ``description`` attributes;
:meth:`RecordStore.open` concatenates them along ``step``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from wpeft.errors import DataError

__all__ = ["RECORDS_DIR", "RecordStore", "Run", "open_run", "scan", "table"]

#: Sub-directory of a run directory holding the record kinds.
RECORDS_DIR = "records"
_INDEX = "index.json"
_FORMAT = 1


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via ``path.tmp`` + :func:`os.replace` (never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _clean_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """Attributes netCDF can store (None and bools become strings / ints)."""
    out = {}
    for k, v in attrs.items():
        if v is None:
            continue
        if isinstance(v, bool):
            v = int(v)
        elif isinstance(v, (list, tuple)) and v and isinstance(v[0], str):
            v = ", ".join(v)
        elif isinstance(v, dict):
            v = json.dumps(v)
        out[k] = v
    return out


def write_netcdf_atomic(ds: xr.Dataset, path: Path, *, compress: bool = False) -> None:
    """Write ``ds`` to ``path`` via ``path.tmp`` + :func:`os.replace`.

    ``compress=False``: netCDF-3 (64-bit offset, xarray's ``scipy`` engine), several times
    faster to write than HDF5 for small records; ``compress=True``: netCDF-4 with zlib level 1
    for large arrays. Readers open either.
    """
    tmp = path.with_name(path.name + ".tmp")
    ds = ds.copy()
    ds.attrs = _clean_attrs(dict(ds.attrs))
    for name in list(ds.variables):
        ds[name].attrs = _clean_attrs(dict(ds[name].attrs))
    if compress:
        encoding = {
            v: {"zlib": True, "complevel": 1}
            for v in ds.data_vars
            if np.issubdtype(ds[v].dtype, np.number) and ds[v].ndim > 0
        }
        ds.to_netcdf(tmp, engine="netcdf4", encoding=encoding)
    else:
        ds.to_netcdf(tmp, engine="scipy", format="NETCDF3_64BIT")
    os.replace(tmp, path)


class RecordStore:
    """Append-only per-step records of one kind: ``<run>/records/<kind>/``.

    Args:
        run_dir: The run directory.
        kind: Record kind, e.g. ``"fisher"`` or ``"attention"`` (a directory name).
        compress: Write chunks as zlib-compressed netCDF-4 (large, rare records) instead of
            netCDF-3 (small, frequent records: faster to write).

    Writer side: :meth:`append` (one chunk per step; appending a step again replaces its chunk,
    as a resumed run re-records the steps after its last checkpoint), :meth:`truncate`,
    :meth:`clear`. Reader side: :meth:`steps`, :meth:`open`.
    """

    def __init__(self, run_dir: str | Path, kind: str, *, compress: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.kind = kind
        self.compress = compress
        self.path = self.run_dir / RECORDS_DIR / kind

    # --- index ------------------------------------------------------------------------------

    def _read_index(self) -> dict[str, Any]:
        try:
            index = json.loads((self.path / _INDEX).read_text())
        except FileNotFoundError:
            return {"format": _FORMAT, "kind": self.kind, "chunks": [], "attrs": {}}
        if index.get("format") != _FORMAT:
            raise DataError(
                f"{self.path / _INDEX} has record format {index.get('format')!r}; this wpeft "
                f"reads format {_FORMAT}."
            )
        return index

    def _write_index(self, index: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        index["chunks"] = sorted(index["chunks"], key=lambda c: c["step"])
        write_json_atomic(self.path / _INDEX, index)

    # --- writer -----------------------------------------------------------------------------

    def append(self, step: int, ds: xr.Dataset, attrs: dict[str, Any] | None = None) -> Path:
        """Add the record of ``step`` (``ds`` without a ``step`` dim: one is added).

        Variables that depend on the step get a leading ``step`` dim; pass step-independent
        metadata (e.g. group sizes) as variables whose name is listed in
        ``ds.attrs["static_variables"]`` (comma-separated), they are stored without it.

        Args:
            step: Integer step of the record (>= 0).
            ds: The record.
            attrs: Attributes of the whole record kind (kept in the index, merged on read).

        Returns:
            The chunk's path.
        """
        if int(step) != step or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}.")
        step = int(step)
        listed = str(ds.attrs.get("static_variables", "")).split(",")
        static = {s.strip() for s in listed if s.strip()}
        variables = {
            name: da if name in static or "step" in da.dims else da.expand_dims(step=[step])
            for name, da in ds.data_vars.items()
        }
        stepped = xr.Dataset(variables, coords=ds.coords, attrs=ds.attrs)
        if "step" not in stepped.coords:
            stepped = stepped.assign_coords(step=[step])
        stepped["step"].attrs.update(
            long_name="optimiser step", units="1", description=ds.attrs.get("step_description", "")
        )
        self.path.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:08d}.nc"
        write_netcdf_atomic(stepped, self.path / name, compress=self.compress)
        index = self._read_index()
        index["chunks"] = [c for c in index["chunks"] if c["step"] != step]
        index["chunks"].append({"step": step, "file": name})
        if attrs:
            index["attrs"] = {**index.get("attrs", {}), **attrs}
        self._write_index(index)
        return self.path / name

    def truncate(self, before: int) -> None:
        """Forget the records of steps >= ``before`` (a resumed run records them again)."""
        index = self._read_index()
        drop = [c for c in index["chunks"] if c["step"] >= before]
        if not drop:
            return
        index["chunks"] = [c for c in index["chunks"] if c["step"] < before]
        self._write_index(index)  # first the index, then the files: readers never miss a file
        for c in drop:
            (self.path / c["file"]).unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove every record of this kind (a fresh run in an old directory)."""
        if not self.path.exists():
            return
        index = self._read_index()
        self._write_index({**index, "chunks": []})
        for f in self.path.iterdir():
            if f.name != _INDEX and f.is_file():
                f.unlink(missing_ok=True)

    # --- reader -----------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Steps of the complete records, ascending."""
        return [c["step"] for c in self._read_index()["chunks"]]

    def open(self, steps: Iterable[int] | None = None) -> xr.Dataset | None:
        """All complete records (or those of ``steps``) concatenated along ``step``, loaded into
        memory (files are closed again, so the writer can keep going). None if there are none.
        """
        for attempt in range(3):
            index = self._read_index()
            chunks = index["chunks"]
            if steps is not None:
                wanted = set(steps)
                chunks = [c for c in chunks if c["step"] in wanted]
            try:
                parts = []
                for c in chunks:
                    with xr.open_dataset(self.path / c["file"]) as ds:
                        parts.append(ds.load())
                break
            except FileNotFoundError:  # a resumed writer dropped chunks after we read the index
                if attempt == 2:
                    raise
        if not parts:
            return None
        static = [str(v) for v in parts[-1].data_vars if "step" not in parts[-1][v].dims]
        stepped = [p.drop_vars([v for v in static if v in p]) for p in parts]
        out = xr.concat(
            stepped, dim="step", data_vars="minimal", coords="minimal", compat="override",
            join="outer", combine_attrs="override",
        )
        for v in static:
            out[v] = parts[-1][v]
        out.attrs = {**parts[-1].attrs, **index.get("attrs", {})}
        return out


# --- reading run directories ----------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


class Run:
    """A run directory opened for reading (while training continues or after it finished).

    Attributes are read from disk on every access (training may still append), except
    :attr:`fields` and :attr:`skill`, which exist once the run is finished and are cached.

    Args:
        path: The run directory (must hold ``config.json``).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise DataError(
                f"{self.path} is not a run directory (no config.json); run `wpeft train` or "
                "wpeft.training.loop.train(cfg, run_dir) to create one."
            )
        self._fields: xr.Dataset | None = None
        self._skill: xr.Dataset | None = None

    def __repr__(self) -> str:
        state = "finished" if self.finished else "running or interrupted"
        return (
            f"Run({str(self.path)!r}, {self.task}/{self.method}, budget={self.budget}, "
            f"seed={self.seed}, {state})"
        )

    # --- JSON files -------------------------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        """The run's ``config.json`` (a :class:`~wpeft.training.loop.TrainConfig` as a dict)."""
        cfg = _read_json(self.path / "config.json")
        assert cfg is not None
        return cfg

    @property
    def summary(self) -> dict[str, Any] | None:
        """``summary.json`` (trainable / changed counts, scores, ...); None while training."""
        return _read_json(self.path / "summary.json")

    @property
    def finished(self) -> bool:
        return (self.path / "summary.json").is_file()

    @property
    def task(self) -> str:
        return str(self.config.get("task"))

    @property
    def method(self) -> str:
        return str(self.config.get("method"))

    @property
    def budget(self) -> float | None:
        return self.config.get("budget")

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def metrics(self) -> pd.DataFrame:
        """``metrics.jsonl`` as a DataFrame (one row per evaluation; empty if none yet). A last
        line still being written is skipped."""
        rows = []
        try:
            lines = (self.path / "metrics.jsonl").read_text().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return pd.DataFrame(rows)

    # --- records ----------------------------------------------------------------------------

    def records(self, kind: str) -> RecordStore:
        """The :class:`RecordStore` of one record kind."""
        return RecordStore(self.path, kind)

    @property
    def fisher(self) -> xr.Dataset | None:
        """Fisher-mask records (:mod:`wpeft.runs.fisher_records`), None for other methods."""
        return self.records("fisher").open()

    @property
    def attention(self) -> xr.Dataset | None:
        """Prompt-attention records (:mod:`wpeft.runs.attention_records`), None without TADP."""
        return self.records("attention").open()

    # --- fields -----------------------------------------------------------------------------

    @property
    def fields(self) -> xr.Dataset | None:
        """``fields.nc`` (test predictions ``<var>`` and truth ``<var>_target``), opened lazily
        (values are read on use); None until the run has finished."""
        if self._fields is None:
            path = self.path / "fields.nc"
            if not path.is_file():
                return None
            self._fields = xr.open_dataset(path, engine="netcdf4")
        return self._fields

    @property
    def skill(self) -> xr.Dataset | None:
        """Per-grid-point skill fields of :attr:`fields` (:func:`wpeft.runs.skill.skill_fields`:
        ``<var>_rmse``, ``<var>_bias``, ``<var>_crps``), None until the run has finished."""
        if self._skill is None:
            if self.fields is None:
                return None
            from wpeft.runs.skill import skill_fields

            self._skill = skill_fields(self)
        return self._skill

    def close(self) -> None:
        """Close ``fields.nc`` if it was opened."""
        if self._fields is not None:
            self._fields.close()
            self._fields = None
            self._skill = None

    def row(self) -> dict[str, Any]:
        """One row of a runs table: identity, counts and scores (NaN while training)."""
        s = self.summary or {}
        trainable, changed = s.get("trainable", {}), s.get("changed", {})
        row: dict[str, Any] = {
            "path": str(self.path),
            "task": self.task,
            "method": self.method,
            "budget": math.nan if self.budget is None else float(self.budget),
            "seed": self.seed,
            "finished": self.finished,
            "steps": self.config.get("steps"),
            "trainable_backbone": trainable.get("backbone", math.nan),
            "trainable_total": trainable.get("total", math.nan),
            "changed_backbone": changed.get("backbone", math.nan),
            "changed_total": changed.get("total", math.nan),
            "budget_fraction": s.get("budget_fraction", math.nan),
            "encoder_decoder_policy": s.get("encoder_decoder_policy"),
            "train_seconds": s.get("train_seconds", math.nan),
        }
        for k, v in s.get("scores", {}).items():
            row[k] = v
        return row


def open_run(path: str | Path) -> Run:
    """Open a run directory (``wpeft.runs.open``)."""
    return Run(path)


def scan(root: str | Path) -> list[Run]:
    """Every run directory under ``root`` (any depth; ``root`` itself included), sorted by path.

    A directory is a run if it holds a ``config.json`` naming a ``task`` and a ``method`` (other
    ``config.json`` files, e.g. of cached data, are skipped).
    """
    root = Path(root)
    found = []
    for cfg in sorted(root.rglob("config.json")):
        if RECORDS_DIR in cfg.relative_to(root).parts[:-1]:
            continue
        try:
            content = json.loads(cfg.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(content, dict) and {"task", "method"} <= content.keys():
            found.append(Run(cfg.parent))
    return found


def table(runs: str | Path | Iterable[Run]) -> pd.DataFrame:
    """A runs table: one row per run (:meth:`Run.row`): task, method, budget, seed, trainable /
    changed counts, budget fraction and every score; ``runs`` is a root directory or runs."""
    if isinstance(runs, (str, Path)):
        runs = scan(runs)
    rows = [r.row() for r in runs]
    df = pd.DataFrame(rows)
    if not df.empty:
        df = df.sort_values(
            ["task", "method", "budget", "seed"], na_position="first", kind="stable"
        )
        df = df.reset_index(drop=True)
    return df
