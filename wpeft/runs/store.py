"""Append-only records inside a run directory, and reading a run directory back.

The files of a run directory are named in :mod:`wpeft.runs.layout`; the records of one kind live
in ``<run>/records/<kind>/``::

    index.json                   the complete chunks, in step order
    step-00000010.nc             one netCDF chunk per recorded step

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from wpeft.errors import DataError
from wpeft.runs.layout import (
    CONFIG,
    METRICS,
    RECORD_INDEX,
    RECORDS_DIR,
    SUMMARY,
    RunFileError,
    RunLayout,
    partial,
    read_json_object,
    run_directories,
)
from wpeft.runs.skill import skill_fields

__all__ = [
    "RECORDS_DIR", "SIZES", "RecordStore", "Run", "RunIdentity", "open_run", "run_sizes", "scan",
    "sort_table", "table",
]

_FORMAT = 1


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via ``path.tmp`` + :func:`os.replace` (never half-written)."""
    tmp = partial(path)
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
    tmp = partial(path)
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
    :meth:`clear`. Reader side: :meth:`read_index`, :meth:`steps`, :meth:`open`.
    """

    def __init__(self, run_dir: str | Path, kind: str, *, compress: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.kind = kind
        self.compress = compress
        self.path = RunLayout(self.run_dir).record_dir(kind)

    # --- index ------------------------------------------------------------------------------

    def read_index(self) -> dict[str, Any]:
        """The index (format, kind, chunks, attrs); empty if there are no records yet.

        Raises:
            RunFileError: it cannot be read, is malformed or of another record format.
        """
        path = self.path / RECORD_INDEX
        name = f"{RECORDS_DIR}/{self.kind}/{RECORD_INDEX}"
        index = read_json_object(path, name)
        if index is None:
            return {"format": _FORMAT, "kind": self.kind, "chunks": [], "attrs": {}}
        found = index.get("format")
        if found != _FORMAT:
            newer = _number(found) and found > _FORMAT
            hint = " (written by a newer wpeft: upgrade wpeft to read it)" if newer else ""
            raise RunFileError(
                name, f"has record format {found!r}; this wpeft reads format {_FORMAT}{hint}", path
            )
        chunks = index.get("chunks")
        if not isinstance(chunks, list) or not all(
            isinstance(c, dict) and isinstance(c.get("step"), int)
            and isinstance(c.get("file"), str) for c in chunks
        ) or not isinstance(index.get("attrs", {}), dict):
            raise RunFileError(
                name, "is malformed (it needs chunks, each with an integer step and a file)", path
            )
        return index

    def _write_index(self, index: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        index["chunks"] = sorted(index["chunks"], key=lambda c: c["step"])
        write_json_atomic(self.path / RECORD_INDEX, index)

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
        index = self.read_index()
        index["chunks"] = [c for c in index["chunks"] if c["step"] != step]
        index["chunks"].append({"step": step, "file": name})
        if attrs:
            index["attrs"] = {**index.get("attrs", {}), **attrs}
        self._write_index(index)
        return self.path / name

    def truncate(self, before: int) -> None:
        """Forget the records of steps >= ``before`` (a resumed run records them again)."""
        index = self.read_index()
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
        index = self.read_index()
        self._write_index({**index, "chunks": []})
        for f in self.path.iterdir():
            if f.name != RECORD_INDEX and f.is_file():
                f.unlink(missing_ok=True)

    # --- reader -----------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Steps of the complete records, ascending."""
        return [c["step"] for c in self.read_index()["chunks"]]

    def open(self, steps: Iterable[int] | None = None) -> xr.Dataset | None:
        """All complete records (or those of ``steps``) concatenated along ``step``, loaded into
        memory (files are closed again, so the writer can keep going). None if there are none.
        """
        for attempt in range(3):
            index = self.read_index()
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

#: Columns a runs table is sorted by (a stable sort: ties keep the order of the runs given).
TABLE_ORDER = ("task", "method", "budget", "seed")
#: ``summary.json`` keys a runs table needs: a finished run without them has a problem.
SUMMARY_KEYS = ("trainable", "changed", "budget_fraction", "scores")
#: Task and method of a run whose ``config.json`` cannot be read.
UNKNOWN = "?"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(value: Any) -> str:
    """A JSON value as a short text for a problem message."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_line(line: bytes) -> dict[str, Any] | None:
    """One JSON-lines record, None if it is not a JSON object."""
    try:
        value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class RunIdentity:
    """What a run's ``config.json`` says the run is (read once).

    Attributes:
        task / method: Registered names (:data:`UNKNOWN` if the config cannot be read).
        budget: The target fraction of backbone parameters (None: the method's default size).
        seed / steps: As configured.
        task_options: The task's further config fields.
        problems: What is wrong with ``config.json`` (a value of the wrong type is read as its
            default), one line each.
        backbone: The backbone architecture (``tiny``, ``prithvi-tiny``...; ``tiny`` for a
            config that names none).
    """

    task: str
    method: str
    budget: float | None
    seed: int
    steps: int | None
    task_options: dict[str, Any]
    problems: tuple[str, ...] = ()
    backbone: str = "tiny"

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> RunIdentity:
        problems = []
        missing = [k for k in ("task", "method") if k not in cfg]
        if missing:
            problems.append(f"{CONFIG} names no {' or '.join(missing)}")
        budget, seed, steps = cfg.get("budget"), cfg.get("seed", 0), cfg.get("steps")
        options = cfg.get("task_options")
        wrong = {  # key -> what it should be, for the keys that are not
            key: expected for key, expected, ok in (
                ("budget", "a number", budget is None or _number(budget)),
                ("seed", "an integer", seed is None or _number(seed) and float(seed).is_integer()),
                ("steps", "an integer", steps is None or _number(steps) and isinstance(steps, int)),
                ("task_options", "an object", options is None or isinstance(options, dict)),
            ) if not ok
        }
        problems += [f"{CONFIG}: {k} is {_show(cfg[k])}, not {e}" for k, e in wrong.items()]
        return cls(
            task=str(cfg.get("task", UNKNOWN)),
            method=str(cfg.get("method", UNKNOWN)),
            budget=None if "budget" in wrong or budget is None else float(budget),
            seed=0 if "seed" in wrong or seed is None else int(seed),
            steps=None if "steps" in wrong else steps,
            task_options={} if "task_options" in wrong else options or {},
            problems=tuple(problems),
            backbone=str(cfg.get("backbone") or "tiny"),
        )

    @classmethod
    def unreadable(cls, problem: str) -> RunIdentity:
        """The identity of a run whose ``config.json`` cannot be read (``problem`` says why)."""
        return cls(UNKNOWN, UNKNOWN, None, 0, None, {}, (problem,), backbone=UNKNOWN)


#: The three sizes every run reports (:func:`run_sizes`): ``summary.json`` key -> what it is.
SIZES = {
    "budget_fraction": "per-step k: scalars allowed to change outside the task head (at the "
                       "last step), as a fraction of the backbone's parameters",
    "changed_fraction": "union: scalars outside the task head that differ from the pretrained "
                        "weights after training, as a fraction of the backbone's parameters",
    "adapter_bytes": "bytes of the adapter file (adapter.safetensors)",
    "adapter_fraction": "adapter bytes as a fraction of the full fine-tuned checkpoint's bytes "
                        "(the backbone's parameters in their dtype, full_checkpoint_bytes)",
}


def run_sizes(summary: dict[str, Any] | None) -> dict[str, float]:
    """The three sizes of a run from its ``summary.json`` (keys of :data:`SIZES`).

    A size the summary records is taken as it is; otherwise it is computed from the counts:
    ``changed_fraction = (changed.total - changed.head) / backbone_parameters`` (the same
    entries ``budget_fraction`` counts: backbone, added modules, encoder/decoder under the
    ``train`` policy) and ``adapter_fraction = adapter_bytes / full_checkpoint_bytes``. What
    cannot be had (a run still training, or written before a key existed, or a value of the
    wrong type) is NaN.

    Example: ``{"changed": {"head": 10, "total": 60}, "backbone_parameters": 1000,
    "adapter_bytes": 500, "full_checkpoint_bytes": 4000, "budget_fraction": 0.02}`` gives
    budget 0.02, changed 0.05, adapter 500 bytes and 0.125 of the full checkpoint.
    """
    s = summary or {}

    def value(key: str) -> float:
        v = s.get(key)
        return float(v) if _number(v) else math.nan

    def ratio(num: float, den: float) -> float:
        return num / den if math.isfinite(num) and math.isfinite(den) and den > 0 else math.nan

    changed = s.get("changed")
    changed = changed if isinstance(changed, dict) else {}
    outside_head = (
        changed["total"] - changed.get("head", 0)
        if _number(changed.get("total")) and _number(changed.get("head", 0)) else math.nan
    )
    sizes = {
        "budget_fraction": value("budget_fraction"),
        "changed_fraction": ratio(outside_head, value("backbone_parameters")),
        "adapter_bytes": value("adapter_bytes"),
        "adapter_fraction": ratio(value("adapter_bytes"), value("full_checkpoint_bytes")),
    }
    recorded = {k: value(k) for k in sizes if k in s}
    return {**sizes, **{k: v for k, v in recorded.items() if math.isfinite(v)}}


def _summary_columns(
    summary: dict[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, float], list[str]]:
    """The runs-table columns of a ``summary.json`` (None while training: all NaN).

    Returns:
        The count / size (:func:`run_sizes`) / policy / time columns, the scores, and what is
        wrong: a key of :data:`SUMMARY_KEYS` missing or a value of the wrong type (read as
        NaN), one line each.
    """
    s = summary or {}
    problems = []
    missing = [k for k in SUMMARY_KEYS if k not in s]
    if summary is not None and missing:
        problems.append(f"{SUMMARY} lacks {', '.join(missing)}")

    def number(label: str, value: Any, *, null_ok: bool = True) -> Any:
        if _number(value):
            return value
        if value is not None or not null_ok:
            problems.append(f"{SUMMARY}: {label} is {_show(value)}, not a number")
        return math.nan

    def mapping(key: str) -> dict[str, Any]:
        value = s.get(key, {})
        if isinstance(value, dict):
            return value
        problems.append(f"{SUMMARY}: {key} is {_show(value)}, not an object")
        return {}

    trainable, changed, scores = mapping("trainable"), mapping("changed"), mapping("scores")
    policy = s.get("encoder_decoder_policy")
    if policy is not None and not isinstance(policy, str):
        problems.append(f"{SUMMARY}: encoder_decoder_policy is {_show(policy)}, not a text")
        policy = None
    columns = {
        "trainable_backbone": number("trainable.backbone", trainable.get("backbone")),
        "trainable_total": number("trainable.total", trainable.get("total")),
        "changed_backbone": number("changed.backbone", changed.get("backbone")),
        "changed_total": number("changed.total", changed.get("total")),
        "budget_fraction": number("budget_fraction", s.get("budget_fraction"),
                                  null_ok="budget_fraction" not in s),
        **{k: v for k, v in run_sizes(s).items() if k != "budget_fraction"},
        "encoder_decoder_policy": policy,
        "train_seconds": number("train_seconds", s.get("train_seconds")),
    }
    values = {str(k): number(f"score {k}", v) for k, v in scores.items()}
    return columns, values, problems


class Run:
    """A run directory opened for reading (while training continues or after it finished).

    Attributes are read from disk on every access (training may still append), except
    :attr:`fields` and :attr:`skill`, which exist once the run is finished and are cached.

    A file that cannot be read is a problem of this run only: :attr:`identity`, :attr:`metrics`
    and :meth:`row` read what they can, and :attr:`problem` says what is wrong; :attr:`config`,
    :attr:`summary` and the records raise :class:`~wpeft.runs.layout.RunFileError` (a
    :class:`~wpeft.errors.DataError`) naming the file.

    Args:
        path: The run directory (must hold ``config.json``).
    """

    def __init__(self, path: str | Path) -> None:
        self.layout = RunLayout(path)
        self.path = self.layout.path
        if not self.layout.has_config:
            raise DataError(
                f"{self.path} is not a run directory (no {CONFIG}); run `wpeft train` or "
                "wpeft.training.loop.train(cfg, run_dir) to create one."
            )
        self._fields: xr.Dataset | None = None
        self._skill: xr.Dataset | None = None

    def __repr__(self) -> str:
        ident = self.identity
        state = "finished" if self.finished else "running or interrupted"
        return (
            f"Run({str(self.path)!r}, {ident.task}/{ident.method}, budget={ident.budget}, "
            f"seed={ident.seed}, {state})"
        )

    # --- JSON files -------------------------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        """The run's ``config.json`` (a :class:`~wpeft.training.loop.TrainConfig` as a dict)."""
        cfg = read_json_object(self.layout.config)
        if cfg is None:
            raise DataError(f"{self.path} no longer holds a {CONFIG}.")
        return cfg

    @property
    def summary(self) -> dict[str, Any] | None:
        """``summary.json`` (trainable / changed counts, scores, ...); None while training."""
        return read_json_object(self.layout.summary)

    @property
    def finished(self) -> bool:
        return self.layout.finished

    @property
    def identity(self) -> RunIdentity:
        """Task, method, budget, seed, steps and task options from one read of the config (task
        and method :data:`UNKNOWN` if it cannot be read)."""
        try:
            cfg = read_json_object(self.layout.config)
        except RunFileError as e:
            return RunIdentity.unreadable(e.brief)
        if cfg is None:
            return RunIdentity.unreadable(f"{CONFIG} is missing")
        return RunIdentity.from_config(cfg)

    @property
    def task(self) -> str:
        return self.identity.task

    @property
    def method(self) -> str:
        return self.identity.method

    @property
    def budget(self) -> float | None:
        return self.identity.budget

    @property
    def seed(self) -> int:
        return self.identity.seed

    @property
    def metrics(self) -> pd.DataFrame:
        """``metrics.jsonl`` as a DataFrame (one row per line: validation lines have ``split``
        ``"val"``, training-loss lines ``"train"``, see :mod:`wpeft.runs.curves`; empty if none
        yet). A last line still being written and lines that are not JSON objects are skipped."""
        return pd.DataFrame(self._read_metrics()[0])

    def _read_metrics(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The rows of ``metrics.jsonl`` and its problems. A last line without its newline is
        being written while the run trains (skipped quietly) and cut off once it finished."""
        try:
            raw = self.layout.metrics.read_bytes()
        except FileNotFoundError:
            return [], []
        except OSError as e:
            return [], [f"{METRICS} cannot be read ({e.strerror or type(e).__name__})"]
        *lines, last = raw.split(b"\n")
        rows, bad = [], []
        for number, line in enumerate(lines, 1):
            row = _json_line(line) if line.strip() else {}
            if row is None:
                bad.append(number)
            elif row:
                rows.append(row)
        problems = []
        if bad:
            which = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" * (len(bad) > 5))
            what = (f"line {which} is not a JSON object" if len(bad) == 1
                    else f"lines {which} are not JSON objects")
            problems.append(f"{METRICS}: {what} (skipped)")
        if last.strip():
            row = _json_line(last)
            if row is not None:
                rows.append(row)
            elif self.finished:
                problems.append(f"{METRICS}: the last line is cut off (skipped)")
        return rows, problems

    # --- problems ---------------------------------------------------------------------------

    def _read_table_row(self) -> tuple[dict[str, Any], list[str]]:
        """The runs-table row without ``problem``, and the problems, reading each file once."""
        ident = self.identity
        try:
            summary, problems = read_json_object(self.layout.summary), []
        except RunFileError as e:
            summary, problems = None, [e.brief]
        columns, scores, found = _summary_columns(summary)
        problems = [*ident.problems, *problems, *found, *self._read_metrics()[1]]
        for kind in self.layout.record_kinds:
            try:
                self.records(kind).steps()
            except RunFileError as e:
                problems.append(e.brief)
        row: dict[str, Any] = {
            "path": str(self.path),
            "task": ident.task,
            "method": ident.method,
            "budget": math.nan if ident.budget is None else ident.budget,
            "seed": ident.seed,
            "finished": self.finished,
            "steps": ident.steps,
            **columns,
        }
        return {**row, **scores}, problems

    def problems(self) -> list[str]:
        """What is wrong with the run's files, one line each naming the file (empty: nothing):
        ``config.json`` / ``summary.json`` that cannot be read (not UTF-8, not JSON, not an
        object) or lack what a runs table needs, values of the wrong type, ``metrics.jsonl``
        lines that are not JSON (a cut-off last line only once the run finished), and record
        indexes that cannot be read or are of another format."""
        return self._read_table_row()[1]

    @property
    def problem(self) -> str | None:
        """:meth:`problems` as one line (``"; "``-separated), None if there is none."""
        return "; ".join(self.problems()) or None

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
            if not self.layout.has_fields:
                return None
            self._fields = xr.open_dataset(self.layout.fields, engine="netcdf4")
        return self._fields

    @property
    def skill(self) -> xr.Dataset | None:
        """Per-grid-point skill fields of :attr:`fields` (:func:`wpeft.runs.skill.skill_fields`:
        ``<var>_rmse``, ``<var>_bias``, ``<var>_crps``), None until the run has finished."""
        if self._skill is None:
            if self.fields is None:
                return None
            self._skill = skill_fields(self)
        return self._skill

    def close(self) -> None:
        """Close ``fields.nc`` if it was opened."""
        if self._fields is not None:
            self._fields.close()
            self._fields = None
            self._skill = None

    def row(self) -> dict[str, Any]:
        """One row of a runs table: identity, counts and scores (NaN while training or where a
        file cannot be read) and ``problem`` (:attr:`problem`: None if there is none)."""
        row, problems = self._read_table_row()
        return {**row, "problem": "; ".join(problems) or None}


def open_run(path: str | Path) -> Run:
    """Open a run directory (``wpeft.runs.open``)."""
    return Run(path)


def scan(root: str | Path) -> list[Run]:
    """Every run directory under ``root`` (any depth; ``root`` itself included), sorted by path
    (:func:`~wpeft.runs.layout.run_directories`, :attr:`~wpeft.runs.layout.RunLayout.is_run`).
    """
    return [Run(d) for d in run_directories(root) if RunLayout(d).is_run]


def sort_table(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Rows of :meth:`Run.row` as a runs table, sorted by :data:`TABLE_ORDER`."""
    df = pd.DataFrame(list(rows))
    if not df.empty:
        df = df.sort_values(list(TABLE_ORDER), na_position="first", kind="stable")
        df = df.reset_index(drop=True)
    return df


def table(runs: str | Path | Iterable[Run]) -> pd.DataFrame:
    """A runs table: one row per run (:meth:`Run.row`): task, method, budget, seed, trainable /
    changed counts, the three sizes (:func:`run_sizes`) and every score; ``runs`` is a root
    directory or runs."""
    if isinstance(runs, (str, Path)):
        runs = scan(runs)
    return sort_table(r.row() for r in runs)
