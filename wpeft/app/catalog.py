"""The runs directory a workbench serves: run names confined to it, and data read once.

Why this module exists. The dashboard is served to a team, so every run name it is given (a
select box, a URL query, a table click) is untrusted input. Run names are POSIX paths relative to
``RUNS_DIR`` (``downscaling/weatherpeft-4pct``); :meth:`Catalog.resolve` accepts a name only if it
is relative, has no ``..`` part, resolves (symlinks followed) inside ``RUNS_DIR`` and is one of
the runs discovered there. Every file the app opens afterwards (``config.json``,
``summary.json``, record indexes and chunks, ``fields.nc``) is checked the same way, so a symlink
planted inside a run cannot make the server read elsewhere. Error messages name what the user
gave, never the server's absolute paths (:meth:`Catalog.sanitize`).

Data are read once for all sessions: :class:`DataCache` (one per process, :data:`CACHE`) keys
every loaded object by what it is and by the ``(inode, size, mtime)`` of the files it came from,
so a run that appends records is reread on the next request and an unchanged one never is.
Discovery (:func:`wpeft.runs.layout.run_directories`) is cached for a few seconds per directory.
What a run directory holds and how it is read is :mod:`wpeft.runs` (:class:`~wpeft.runs.Run`,
:class:`~wpeft.runs.layout.RunLayout`); this module adds the path checks. Nothing here imports
Panel: this is plain Python, unit-tested without a browser.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

import numpy as np
import pandas as pd
import xarray as xr

from wpeft.data.source import on_earth
from wpeft.errors import DataError, WpeftError
from wpeft.runs.layout import FIELDS, RECORD_KINDS, RunLayout, run_directories

__all__ = [
    "CACHE",
    "Catalog",
    "DataCache",
    "RunEntry",
    "RunNameError",
    "RunsDirError",
    "RunsWatcher",
    "catalog_for",
    "check_runs_dir",
    "file_signature",
    "read_metrics_lines",
    "split_variable",
    "validate_run_name",
]

log = logging.getLogger(__name__)

_CHUNK_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class RunsDirError(WpeftError, ValueError):
    """``RUNS_DIR`` does not exist or is not a directory (the server refuses to start)."""


class RunNameError(DataError):
    """A run name that is empty, malformed, outside ``RUNS_DIR`` or not a known run.

    Attributes:
        name: The name as given (str() of it).
        reason: ``"empty"``, ``"invalid"``, ``"outside"`` or ``"unknown"``.
    """

    def __init__(self, message: str, name: str, reason: str) -> None:
        super().__init__(message)
        self.name = name
        self.reason = reason


def check_runs_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` resolved, if it is an existing directory; else :class:`RunsDirError`."""
    p = Path(path).expanduser()
    if not p.exists():
        raise RunsDirError(
            f"RUNS_DIR {str(path)!r} does not exist; give the directory that holds your run "
            "directories (e.g. the --out of `wpeft demo` or the --root of `wpeft compare`)."
        )
    if not p.is_dir():
        raise RunsDirError(f"RUNS_DIR {str(path)!r} is not a directory.")
    return p.resolve()


def validate_run_name(name: Any) -> PurePosixPath:
    """The syntactic checks of a run name (no file system access).

    Raises:
        RunNameError: ``empty``; ``invalid`` (control characters, backslashes, over 512
            characters); ``outside`` (absolute, ``~``, a drive, or a ``..`` part).
    """
    text = "" if name is None else str(name)
    if not text.strip():
        raise RunNameError("No run is selected.", text, "empty")
    if len(text) > 512 or any(ord(c) < 32 for c in text) or "\\" in text:
        raise RunNameError(
            f"{text[:80]!r} is not a valid run name: run names are paths relative to the runs "
            "directory, with '/' between folders.", text, "invalid",
        )
    posix = PurePosixPath(text)
    if posix.is_absolute() or text.startswith("~") or PureWindowsPath(text).drive:
        raise RunNameError(
            f"Run name {text!r} is an absolute path; only run names relative to the runs "
            "directory are accepted (pick one from the list).", text, "outside",
        )
    if ".." in posix.parts:
        raise RunNameError(
            f"Run name {text!r} points outside the runs directory ('..' is not allowed); only "
            "runs inside it can be shown.", text, "outside",
        )
    return posix


def _inside(root: Path, path: Path) -> bool:
    """``path`` resolves (symlinks followed) to ``root`` or below it."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # symlink loops
        return False


def file_signature(*paths: Path) -> tuple[Any, ...]:
    """``(inode, size, mtime_ns)`` of each path (None if missing): changes whenever a file is
    rewritten, including by :func:`os.replace` of a same-sized file."""
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


_QUALIFIER = re.compile(r"^(?P<base>.+)_(?P<q>\d+h?)$")


def split_variable(name: str) -> tuple[str, str]:
    """``"temperature_850"`` -> ``("temperature", "850")`` (a level, hPa);
    ``"total_precipitation_6hr_12h"`` -> ``("total_precipitation_6hr", "12h")`` (a lead);
    ``"2m_temperature"`` -> ``("2m_temperature", "")``."""
    m = _QUALIFIER.match(name)
    if m is None:
        return name, ""
    return m.group("base"), m.group("q")


class DataCache:
    """A thread-safe LRU of loaded objects, each stored with the signature of its sources.

    :meth:`get` returns the stored value when the key is present with the same signature and
    computes (and stores) it otherwise; concurrent requests for one key compute it once.
    ``hits`` / ``misses`` count the outcomes (for tests and the server log).
    """

    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self._data: OrderedDict[Hashable, tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[Hashable, threading.Lock] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._key_locks.clear()
            self.hits = self.misses = 0

    def _lookup(self, key: Hashable, signature: Any) -> tuple[bool, Any]:
        with self._lock:
            if key in self._data and self._data[key][0] == signature:
                self._data.move_to_end(key)
                self.hits += 1
                return True, self._data[key][1]
        return False, None

    def get(self, key: Hashable, signature: Any, compute: Callable[[], Any]) -> Any:
        found, value = self._lookup(key, signature)
        if found:
            return value
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            found, value = self._lookup(key, signature)  # another session just loaded it
            if found:
                return value
            value = compute()
            with self._lock:
                self.misses += 1
                self._data[key] = (signature, value)
                self._data.move_to_end(key)
                while len(self._data) > self.max_entries:
                    old, _ = self._data.popitem(last=False)
                    self._key_locks.pop(old, None)
            return value


#: The process-wide cache every :class:`Catalog` shares (all sessions of a server).
CACHE = DataCache()
#: The process-wide cache of pre-rendered images (PNG bytes, tens of kB each), apart from
#: :data:`CACHE` so that a step player's images never push loaded data out.
IMAGES = DataCache(max_entries=512)


@dataclass(frozen=True)
class RunEntry:
    """A run found in ``RUNS_DIR``.

    Attributes:
        name: Path relative to ``RUNS_DIR``, '/'-separated: the run's name in the app and URL.
        path: The run directory (absolute, resolved; never shown to users).
        task / method / budget / seed: From ``config.json``.
        earth: Real-Earth data (coastlines on maps) rather than the synthetic world.
        finished: ``summary.json`` exists.
        has_fisher / has_attention: Fisher-mask / prompt-attention records exist.
        has_fields: ``fields.nc`` (test predictions) exists.
        backbone: The backbone architecture from ``config.json`` (``tiny``, ``prithvi-tiny``).
    """

    name: str
    path: Path
    task: str
    method: str
    budget: float | None
    seed: int
    earth: bool
    finished: bool
    has_fisher: bool
    has_attention: bool
    has_fields: bool
    backbone: str = "tiny"

    @property
    def label(self) -> str:
        """``name (method, budget, backbone)`` for select boxes."""
        budget = "default size" if self.budget is None else f"{100 * self.budget:g}%"
        state = "" if self.finished else ", training"
        return f"{self.name} ({self.method}, {budget}, {self.backbone}{state})"


class Catalog:
    """The runs of one ``RUNS_DIR``, confined to it, with cached readers.

    One instance per directory is shared by all sessions (:func:`catalog_for`); it holds no
    per-user state. Every method taking a run name validates it with :meth:`resolve`.

    Args:
        root: ``RUNS_DIR`` (must exist; see :func:`check_runs_dir`).
        cache: Where loaded data live (default: the process-wide :data:`CACHE`).
        discovery_ttl: Seconds a directory walk is reused before ``RUNS_DIR`` is walked again.
        images: Where pre-rendered images live (:meth:`record_png`; default: the process-wide
            :data:`IMAGES`, or a cache of this catalog's own when ``cache`` is given).
    """

    def __init__(
        self, root: str | os.PathLike[str], *, cache: DataCache | None = None,
        discovery_ttl: float = 3.0, images: DataCache | None = None,
    ) -> None:
        self.root = check_runs_dir(root)
        self.cache = CACHE if cache is None else cache
        if images is None:
            images = IMAGES if cache is None else DataCache(IMAGES.max_entries)
        self.images = images
        self.discovery_ttl = discovery_ttl
        self._runs: list[RunEntry] = []
        self._scanned_at = -math.inf
        self._lock = threading.Lock()
        self._watcher: RunsWatcher | None = None

    def __repr__(self) -> str:
        return f"Catalog({self.root.name!r}, {len(self._runs)} runs)"

    # --- confinement ------------------------------------------------------------------------

    def sanitize(self, message: str) -> str:
        """``message`` with the server's absolute paths replaced by ``RUNS_DIR``."""
        for prefix in {str(self.root), os.path.realpath(self.root)}:
            message = message.replace(prefix, "RUNS_DIR")
        return message

    def _file(self, run_path: Path, *parts: str | Path) -> Path | None:
        """``run_path/parts`` (or a path of its :class:`RunLayout`) if it is a regular file
        inside ``RUNS_DIR`` (None if missing); :class:`DataError` if it resolves outside (a
        planted symlink)."""
        p = run_path.joinpath(*parts)
        if not (p.is_file() or p.is_symlink()):
            return None
        if not _inside(self.root, p):
            rel = p.relative_to(run_path).as_posix()
            raise DataError(f"{rel} of this run points outside the runs directory; not read.")
        return p if p.is_file() else None

    # --- discovery --------------------------------------------------------------------------

    def _entry(self, run_dir: Path) -> RunEntry | None:
        from wpeft.runs.store import Run

        layout = RunLayout(run_dir)
        try:
            for path in layout.read_files:  # every file a reader opens stays inside RUNS_DIR
                self._file(run_dir, path)
            if not layout.is_run:
                return None
            ident = Run(run_dir).identity
        except (OSError, ValueError) as e:  # unreadable, bad JSON, or a symlink out
            log.warning("skipping %s: %s", self.sanitize(str(run_dir)), self.sanitize(str(e)))
            return None
        return RunEntry(
            name=run_dir.relative_to(self.root).as_posix() if run_dir != self.root else ".",
            path=run_dir,
            task=ident.task,
            method=ident.method,
            budget=ident.budget,
            seed=ident.seed,
            earth=on_earth(ident.task_options),
            finished=layout.finished,
            has_fisher=layout.has_records("fisher"),
            has_attention=layout.has_records("attention"),
            has_fields=layout.has_fields,
            backbone=ident.backbone,
        )

    def _walk(self) -> list[RunEntry]:
        entries = (self._entry(d) for d in run_directories(self.root))
        return [e for e in entries if e is not None]

    def runs(self, *, refresh: bool = False) -> list[RunEntry]:
        """The runs in ``RUNS_DIR`` (any depth; directory symlinks are not followed), sorted by
        name; the walk is reused for ``discovery_ttl`` seconds unless ``refresh``."""
        with self._lock:
            now = time.monotonic()
            if refresh or now - self._scanned_at > self.discovery_ttl:
                self._runs = self._walk()
                self._scanned_at = now
            return list(self._runs)

    def names(self) -> list[str]:
        return [e.name for e in self.runs()]

    def default_run(self) -> str:
        """The run a new session opens: the first run with Fisher records, else the first run
        ('' when there is none)."""
        runs = self.runs()
        best = next((e for e in runs if e.has_fisher), runs[0] if runs else None)
        return best.name if best else ""

    def warm_up(self) -> None:
        """Read once, for every session to come, what a new session shows first: the runs
        table, the default run's Fisher and attention records and the scorecard of its task
        (what the Scorecard view shows without a choice; something that cannot be read is
        left for its view to report)."""
        self.table()
        name = self.default_run()
        if not name:
            return
        rows = [e.name for e in self.task_runs(name)]
        reads = [lambda: self.fisher(name), lambda: self.attention(name)]
        if rows:
            reads.append(lambda: self.scorecard(rows, self.default_reference(rows, name)))
        for read in reads:
            try:
                read()
            except WpeftError as e:
                log.info("warm-up: %s", e)

    def task_runs(self, name: str) -> list[RunEntry]:
        """Every finished run of the task of run ``name`` (the Scorecard's rows by default)."""
        task = self.resolve(name).task
        return [e for e in self.runs() if e.finished and e.task == task]

    def default_reference(self, names: Sequence[str], run: str) -> str:
        """The reference of a scorecard of runs ``names`` (not empty) when none is chosen: the
        first Full-Tuning run among them, else ``run`` if it is one of them, else the first."""
        by_name = {e.name: e for e in self.runs()}
        full = next((n for n in names if n in by_name and by_name[n].method == "full"), None)
        return full or (run if run in names else names[0])

    def resolve(self, name: Any) -> RunEntry:
        """The run called ``name``.

        Raises:
            RunNameError: see :func:`validate_run_name`; ``outside`` also when the name resolves
                outside ``RUNS_DIR`` through a symlink; ``unknown`` when no run has that name.
        """
        posix = validate_run_name(name)
        text = str(name)
        if not _inside(self.root, self.root / posix):
            raise RunNameError(
                f"Run name {text!r} leads outside the runs directory (through a symbolic link); "
                "only runs inside it can be shown.", text, "outside",
            )
        key = posix.as_posix()
        for refresh in (False, True):  # a run created a moment ago: walk again once
            for entry in self.runs(refresh=refresh):
                if entry.name == key:
                    return entry
        known = self.names()
        hint = (
            f" Known runs: {', '.join(known[:8])}{' ...' if len(known) > 8 else ''}."
            if known else " This runs directory holds no runs yet."
        )
        raise RunNameError(f"There is no run named {text!r} in this runs directory.{hint}",
                           text, "unknown")

    # --- cached readers ---------------------------------------------------------------------

    def _index_files(self, entry: RunEntry, kind: str) -> Path | None:
        """``records/<kind>/index.json`` after checking every chunk it lists stays inside."""
        from wpeft.runs.store import RecordStore

        index_path = self._file(entry.path, RunLayout(entry.path).record_index(kind))
        if index_path is None:
            return None
        for chunk in RecordStore(entry.path, kind).read_index()["chunks"]:
            name = chunk["file"]
            if not _CHUNK_NAME.match(name) or name in {".", ".."}:
                raise DataError(f"The {kind} record index lists a bad chunk name {name!r}.")
            self._file(entry.path, RunLayout(entry.path).record_dir(kind), name)
        return index_path

    def records(self, name: str, kind: Literal["fisher", "attention"]) -> xr.Dataset | None:
        """A run's records of one kind (None if it has none), read once per change."""
        from wpeft.runs.store import RecordStore

        entry = self.resolve(name)
        index_path = RunLayout(entry.path).record_index(kind)

        def load() -> xr.Dataset | None:
            if self._index_files(entry, kind) is None:
                return None
            try:
                return RecordStore(entry.path, kind).open()
            except DataError:
                raise
            except (OSError, ValueError, KeyError) as e:  # a chunk cut short or damaged
                raise DataError(
                    f"The {kind} records of run {entry.name!r} cannot be read: "
                    f"{self._bad_chunk(entry, kind)} is damaged or truncated "
                    f"({type(e).__name__}). Its other views are unaffected; rewrite or remove "
                    "the file (or the run's records) to show them."
                ) from e

        return self.cache.get((kind, str(entry.path)), file_signature(index_path), load)

    @staticmethod
    def _bad_chunk(entry: RunEntry, kind: str) -> str:
        """The first record chunk of ``entry`` that cannot be opened, relative to the run."""
        from wpeft.runs.store import RecordStore

        store = RecordStore(entry.path, kind)
        for chunk in store.read_index()["chunks"]:
            try:
                with xr.open_dataset(store.path / chunk["file"]):
                    pass
            except (OSError, ValueError, KeyError):
                return (store.path / chunk["file"]).relative_to(entry.path).as_posix()
        return f"a record file of records/{kind}"

    def record_png(self, name: str, kind: Literal["fisher", "attention"],
                   what: tuple[Hashable, ...], render: Callable[[xr.Dataset], bytes]) -> bytes:
        """``render(records)``: a picture of a run's records of one kind, rendered once per
        version of the records for every session (cached in :attr:`images` under the run,
        ``kind`` and ``what``, which must name everything the picture depends on).

        Raises:
            DataError: the run has no records of this kind.
        """
        entry = self.resolve(name)
        signature = file_signature(RunLayout(entry.path).record_index(kind))  # before reading
        records = self.records(name, kind)
        if records is None:
            raise DataError(f"Run {entry.name!r} has no {kind} records to draw.")
        return self.images.get((kind, str(entry.path), *what), signature,
                               lambda: render(records))

    def fisher(self, name: str) -> xr.Dataset | None:
        """Fisher-mask records (:attr:`wpeft.runs.Run.fisher`)."""
        return self.records(name, "fisher")

    def attention(self, name: str) -> xr.Dataset | None:
        """Prompt-attention records (:attr:`wpeft.runs.Run.attention`)."""
        return self.records(name, "attention")

    def fields(self, name: str) -> xr.Dataset | None:
        """``fields.nc`` loaded into memory (file closed again), None before the run finishes."""
        entry = self.resolve(name)
        path = RunLayout(entry.path).fields

        def load() -> xr.Dataset | None:
            checked = self._file(entry.path, path)
            if checked is None:
                return None
            try:
                with xr.open_dataset(checked, engine="netcdf4") as ds:
                    out = ds.load()
            except (OSError, ValueError, KeyError) as e:  # cut short, or still being copied
                raise DataError(
                    f"{FIELDS} of run {entry.name!r} cannot be read ({type(e).__name__}: it is "
                    "damaged or truncated, or still being copied); its skill maps are not "
                    "shown, its records and scores are."
                ) from e
            out.attrs["run"] = entry.name
            return out

        return self.cache.get(("fields", str(entry.path)), file_signature(path), load)

    def skill_variables(self, name: str) -> list[str]:
        """Flattened names of a finished run's predicted variables (``temperature_850``)."""
        from wpeft.runs.skill import predicted_variables

        fields = self._require_fields(name)
        out = []
        for v in predicted_variables(fields):
            if "level" in fields[v].dims:
                out += [f"{v}_{int(lv)}" for lv in fields[v]["level"].values]
            else:
                out.append(v)
        return out

    def skill_metrics(self, name: str) -> list[str]:
        """Metrics a run's skill can be mapped with: rmse, bias, and crps when it predicts σ."""
        fields = self._require_fields(name)
        sigma = any(str(v).endswith("_sigma") for v in fields.data_vars)
        return ["rmse", "bias"] + (["crps"] if sigma else [])

    def _require_fields(self, name: str) -> xr.Dataset:
        fields = self.fields(name)
        if fields is None:
            raise DataError(
                f"Run {name!r} has no test fields yet ({FIELDS} is written when training ends)."
            )
        return fields

    def skill_map(self, name: str, variable: str, metric: str = "rmse") -> xr.DataArray:
        """One run's per-grid-point ``metric`` of a flattened ``variable`` on (lat, lon)."""
        from wpeft.runs.skill import skill_fields

        entry = self.resolve(name)
        fields = self._require_fields(name)
        skill = self.cache.get(
            ("skill", str(entry.path), metric),
            file_signature(RunLayout(entry.path).fields),
            lambda: skill_fields(fields, metrics=(metric,)),
        )
        if f"{variable}_{metric}" in skill:
            return skill[f"{variable}_{metric}"].rename(variable)
        base, level = split_variable(variable)
        da = skill.get(f"{base}_{metric}")
        if da is not None and level.isdigit() and "level" in da.dims:
            return da.sel(level=int(level), drop=True).rename(variable)
        raise DataError(f"Run {name!r} has no {metric} skill for {variable!r}.")

    def skill_difference(self, name_a: str, name_b: str, metric: str = "rmse") -> xr.Dataset:
        """:func:`wpeft.runs.skill_difference` of two runs (all shared variables), cached."""
        from wpeft.runs.skill import skill_difference

        a, b = self.resolve(name_a), self.resolve(name_b)
        fa, fb = self._require_fields(name_a), self._require_fields(name_b)
        if a.task != b.task:
            raise DataError(
                f"Runs {a.name!r} ({a.task}) and {b.name!r} ({b.task}) are of different tasks; "
                "compare runs of one task."
            )
        return self.cache.get(
            ("difference", str(a.path), str(b.path), metric),
            file_signature(RunLayout(a.path).fields, RunLayout(b.path).fields),
            lambda: skill_difference(fa, fb, metric),  # type: ignore[arg-type]
        )

    def table(self) -> pd.DataFrame:
        """The runs table (:func:`wpeft.runs.table`) with a ``run`` name column first and no
        absolute paths; a run whose files cannot be read is listed with its ``problem``. Reread
        when any run's config, summary, metrics or record indexes change."""
        from wpeft.runs.store import sort_table

        entries = self.runs()

        def load() -> pd.DataFrame:
            return sort_table({"run": e.name, **self._row(e)} for e in entries)

        signature = tuple((e.name, self._run_signature(e.path, table=True)) for e in entries)
        return self.cache.get(("table", str(self.root)), signature, load)

    def _row(self, entry: RunEntry) -> dict[str, Any]:
        """:meth:`wpeft.runs.Run.row` without the path; an unexpected failure becomes the row's
        problem (one run never breaks the table)."""
        from wpeft.runs.store import Run

        try:
            row = Run(entry.path).row()
        except Exception as err:  # noqa: BLE001 -- logged; the table shows the others
            log.warning("runs table: %s: %s", entry.name, self.sanitize(repr(err)))
            row = {
                "task": entry.task, "method": entry.method,
                "budget": math.nan if entry.budget is None else entry.budget,
                "seed": entry.seed, "finished": entry.finished,
                "problem": f"cannot be read ({type(err).__name__}; the server log has details)",
            }
        row.pop("path", None)
        return row

    @staticmethod
    def _run_signature(run_dir: Path, *, table: bool = False) -> tuple[Any, ...]:
        """Signature of a run's config and summary; with ``table`` also of what the table's
        ``problem`` column reads (metrics, record indexes)."""
        layout = RunLayout(run_dir)
        more = [layout.metrics, *(layout.record_index(k) for k in RECORD_KINDS)] if table else []
        return file_signature(layout.config, layout.summary, *more)

    def watcher(self, interval: float = 2.0) -> RunsWatcher:
        """The one :class:`RunsWatcher` of this catalog (made on first use with ``interval``
        seconds; later calls return it as it is)."""
        with self._lock:
            if self._watcher is None:
                self._watcher = RunsWatcher(self, interval)
            return self._watcher

    def budget_table(self, task: str, score: str, size: str = "budget_fraction") -> pd.DataFrame:
        """Finished runs of ``task`` with a ``size`` > 0 (a column of
        :func:`~wpeft.runs.store.run_sizes`: per-step k by default) and a finite ``score``."""
        df = self.table()
        if df.empty or score not in df.columns or size not in df.columns:
            return df.iloc[0:0]
        frac = pd.to_numeric(df[size], errors="coerce")
        vals = pd.to_numeric(df[score], errors="coerce")
        keep = (df["task"] == task) & (frac > 0) & np.isfinite(vals)
        return df[keep.fillna(False)].reset_index(drop=True)

    def curves(self, names: Iterable[str]) -> pd.DataFrame:
        """The ``metrics.jsonl`` lines of runs ``names`` as one long table: columns ``run``,
        ``method``, ``split`` (``train`` / ``val``), ``step``, ``column`` (``loss``,
        ``rmse/2m_temperature``, ...) and ``value``, one row per finite number; a step logged
        twice keeps its last line. The ``loss`` of a validation line is the training loss of
        its step (what the loop logs there): it is a ``train`` row, where no training line of
        that step gives one. Each run is read once per change of its ``metrics.jsonl``
        (a training run appends: the next call rereads it). Lines that are not JSON are
        skipped and named in ``frame.attrs["problems"]`` (run, file, line number)."""
        entries = [self.resolve(n) for n in dict.fromkeys(map(str, names))]
        parts, problems = [], []
        for entry in entries:
            path = RunLayout(entry.path).metrics
            frame, found = self.cache.get(
                ("curves", str(entry.path)), file_signature(path),
                lambda entry=entry: self._curve_rows(entry),
            )
            parts.append(frame)
            problems += [f"{entry.name}: {p}" for p in found]
        out = pd.concat(parts, ignore_index=True) if parts else _curves_frame([])
        out.attrs["problems"] = problems
        return out

    def _curve_rows(self, entry: RunEntry) -> tuple[pd.DataFrame, list[str]]:
        path = self._file(entry.path, RunLayout(entry.path).metrics)
        if path is None:
            return _curves_frame([]), []
        lines, problems = METRICS_LOG.read(path)
        by_key: dict[tuple[str, int], dict[str, Any]] = {}
        for line in lines:
            split, step = line.get("split"), line.get("step")
            if split in ("train", "val") and _number(step):
                by_key[(str(split), int(step))] = line
        rows = []
        for (split, step), line in sorted(by_key.items()):
            for k, v in line.items():
                if k in ("split", "step") or not _number(v):
                    continue
                if split == "val" and k == "loss":
                    # the loop logs the *training* loss of that step with its validation
                    # scores (wpeft.runs.curves): a training point, unless a train line has it
                    if ("train", step) not in by_key:
                        rows.append((entry.name, entry.method, "train", step, "loss", float(v)))
                    continue
                rows.append((entry.name, entry.method, split, step, str(k), float(v)))
        rows.sort(key=lambda r: (r[2], r[3]))  # by split, then step
        return _curves_frame(rows), problems

    def scorecard(self, names: Iterable[str], reference: str) -> xr.Dataset:
        """:func:`wpeft.runs.scorecard.scorecard` of runs ``names`` against ``reference``,
        cached; rows are labelled with the run names of this catalog (``run`` and
        ``attrs["reference"]``) and no server path is kept in it.

        Raises:
            ConfigError: see :func:`~wpeft.runs.scorecard.scorecard` (an unfinished run, another
                task, other variables).
        """
        from wpeft.runs.scorecard import scorecard
        from wpeft.runs.store import Run

        ref = self.resolve(reference)
        entries = [ref, *(e for e in map(self.resolve, dict.fromkeys(map(str, names)))
                          if e.path != ref.path)]
        files = []
        for e in entries:
            layout = RunLayout(e.path)
            for p in (layout.summary, layout.fields):
                self._file(e.path, p)  # a planted symlink is refused before anything is read
            files += [layout.summary, layout.fields]

        def load() -> xr.Dataset:
            card = scorecard([Run(e.path) for e in entries[1:]], Run(ref.path))
            card = card.drop_vars("run_path").assign_coords(run=[e.name for e in entries])
            card.attrs.pop("reference_path", None)
            card.attrs["reference"] = ref.name
            return card

        key = ("scorecard", *(str(e.path) for e in entries))
        return self.cache.get(key, file_signature(*files), load)

    def signature(
        self, names: Iterable[str] = (), *, metrics: Iterable[str] = ()
    ) -> tuple[Any, ...]:
        """A cheap fingerprint of what a session shows: the run list, each run's
        ``config.json`` / ``summary.json``, for ``names`` their record indexes and
        ``fields.nc``, and for ``metrics`` their ``metrics.jsonl`` (the curves of a training
        run; watched only while they are shown, since a training run appends every few
        steps). Changes exactly when a view may need redrawing (used for polling)."""
        entries = self.runs()
        by_name = {e.name: e for e in entries}
        sig: list[Any] = [(e.name, self._run_signature(e.path)) for e in entries]
        for n in names:
            e = by_name.get(str(n))
            if e is not None:
                layout = RunLayout(e.path)
                indexes = [layout.record_index(kind) for kind in RECORD_KINDS]
                sig.append(file_signature(*indexes, layout.fields))
        for n in metrics:
            e = by_name.get(str(n))
            if e is not None:
                sig.append(("metrics", e.name, file_signature(RunLayout(e.path).metrics)))
        return tuple(sig)


_CURVE_COLUMNS = ["run", "method", "split", "step", "column", "value"]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _curves_frame(rows: list[tuple[Any, ...]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=_CURVE_COLUMNS)
    return frame.astype({"step": "int64", "value": "float64"})


def read_metrics_lines(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The JSON objects of a ``metrics.jsonl`` and one problem per line that is not one,
    naming the file and the line number (blank lines are skipped silently). A last line
    without its newline that does not parse is reported too: the run was cut off there, or it
    is being written right now (the next read has it). Reads the whole file (see
    :class:`MetricsLog` for a log that a training run keeps appending to)."""
    return MetricsLog().read(path)


@dataclass
class _LogState:
    ident: tuple[int, int]  # (st_dev, st_ino): a rewritten file is another file
    offset: int = 0  # bytes read: the end of the last complete line
    tail: bytes = b""  # up to _TAIL bytes before offset, to tell an append from a rewrite
    count: int = 0  # complete lines read (blank ones included: line numbers)
    lines: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


_TAIL = 256


class MetricsLog:
    """``metrics.jsonl`` files read incrementally: a file that grew since the last read (same
    file, the bytes before the last read's end unchanged) is read from where that read ended,
    so a live run's curves cost its new lines, not its whole log. A last line without its
    newline is parsed (or named as cut off) on every read but never kept: the next read
    takes it whole.

    Thread-safe, one lock per file (reads of different files run side by side). Memory is
    bounded: the parsed lines of the least recently read files are let go once all files
    together hold more than ``max_lines`` (the next read of such a file starts afresh).

    Args:
        max_lines: Parsed lines kept over all files, >= 1 (the file just read is always kept).
    """

    def __init__(self, max_lines: int = 2_000_000) -> None:
        if max_lines < 1:
            raise ValueError(f"MetricsLog max_lines {max_lines!r} must be >= 1.")
        self.max_lines = max_lines
        self._states: OrderedDict[str, _LogState] = OrderedDict()  # least recently read first
        self._locks: dict[str, threading.Lock] = {}  # one per file ever read (kept: small)
        self._lock = threading.Lock()  # guards the two dicts above, never held while reading

    def __len__(self) -> int:
        """Files whose parsed lines are kept."""
        return len(self._states)

    def kept_lines(self) -> int:
        """Parsed lines kept over all files."""
        with self._lock:
            return sum(len(s.lines) for s in self._states.values())

    def read(self, path: Path) -> tuple[list[dict[str, Any]], list[str]]:
        """All lines of ``path`` (as :func:`read_metrics_lines`), reading only what is new."""
        key = str(path)
        with self._lock:
            file_lock = self._locks.setdefault(key, threading.Lock())
        with file_lock, open(path, "rb") as f:
            st = os.fstat(f.fileno())
            with self._lock:
                state = self._states.get(key)
            if state is not None and not self._appended(f, st, state):
                state = None
            if state is None:
                state = _LogState((st.st_dev, st.st_ino))
            f.seek(state.offset)
            new = f.read()
            end = new.rfind(b"\n") + 1  # complete lines up to here
            self._parse(new[:end], state.count, path.name, state.lines, state.problems, None)
            state.count += new[:end].count(b"\n")
            state.tail = (state.tail + new[:end])[-_TAIL:]
            state.offset += end
            lines, problems = list(state.lines), list(state.problems)
            self._parse(new[end:], state.count, path.name, lines, problems, state.count + 1)
            self._keep(key, state)
            return lines, problems

    def _keep(self, key: str, state: _LogState) -> None:
        """Hold ``state`` as the most recently read, letting go of the least recently read
        files' lines while the total is over ``max_lines``."""
        with self._lock:
            self._states[key] = state
            self._states.move_to_end(key)
            total = sum(len(s.lines) for s in self._states.values())
            while total > self.max_lines and len(self._states) > 1:
                _, dropped = self._states.popitem(last=False)
                total -= len(dropped.lines)

    @staticmethod
    def _appended(f: Any, st: os.stat_result, state: _LogState) -> bool:
        if (st.st_dev, st.st_ino) != state.ident or st.st_size < state.offset:
            return False
        f.seek(state.offset - len(state.tail))
        return f.read(len(state.tail)) == state.tail

    @staticmethod
    def _parse(data: bytes, before: int, name: str, lines: list[dict[str, Any]],
               problems: list[str], last: int | None) -> None:
        """Parse ``data`` (lines ``before + 1``, ...) into ``lines`` and ``problems``; ``last``:
        the number of a line without its newline (reported as cut off if it does not parse)."""
        chunks = data.split(b"\n")[:-1] if last is None else [data]
        for number, chunk in enumerate(chunks, before + 1):
            if not chunk.strip():
                continue
            try:
                value = json.loads(chunk.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                value = None
            if isinstance(value, dict):
                lines.append(value)
            elif number == last:
                problems.append(f"{name} line {number} (the last) is cut off; skipped, the "
                                "curves end at the line before it")
            else:
                problems.append(f"{name} line {number} is not a JSON object; skipped")


#: The metrics logs of every catalog of this process.
METRICS_LOG = MetricsLog()


@dataclass(frozen=True)
class _Watched:
    """What one subscriber of :class:`RunsWatcher` watches: run names (records, fields) and
    runs whose ``metrics.jsonl`` counts too."""

    names: Callable[[], Iterable[str]]
    metrics: Callable[[], Iterable[str]] | None = None

    def key(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(names, metrics)`` now: the arguments of :meth:`Catalog.signature`."""
        metrics = () if self.metrics is None else tuple(str(n) for n in self.metrics())
        return tuple(str(n) for n in self.names()), metrics


class RunsWatcher:
    """One thread per catalog that watches ``RUNS_DIR`` for every session of a server.

    Each session subscribes (:meth:`subscribe`) with the run names it shows and a ``notify`` callback;
    every ``interval`` seconds the thread computes :meth:`Catalog.signature` once per distinct
    set of names (a few ``stat`` calls per run) and calls ``notify`` of only the subscribers
    whose signature changed. ``notify`` runs on the watcher thread: a Panel session hands the
    work to its own document (``doc.add_next_tick_callback``). Idle tabs cost nothing per tab.

    Args:
        catalog: The catalog whose runs are watched.
        interval: Seconds between two checks.
    """

    def __init__(self, catalog: Catalog, interval: float = 2.0) -> None:
        if interval <= 0:
            raise ValueError(f"RunsWatcher interval {interval!r} must be positive (seconds).")
        self.catalog = catalog
        self.interval = interval
        self.checks = 0
        self._subs: dict[int, tuple[_Watched, Callable[[], None], Any]] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def __len__(self) -> int:
        return len(self._subs)

    def subscribe(
        self,
        names: Callable[[], Iterable[str]],
        notify: Callable[[], None],
        metrics: Callable[[], Iterable[str]] | None = None,
    ) -> int:
        """Watch the runs ``names()`` returns, and the ``metrics.jsonl`` of those ``metrics()``
        returns (both asked at every check), and call ``notify`` when they or the run list
        change; returns a token for :meth:`unsubscribe`. Starts the thread on the first
        subscription."""
        watched = _Watched(names, metrics)
        names_now, metrics_now = watched.key()
        sig = self.catalog.signature(names_now, metrics=metrics_now)
        with self._lock:
            token = self._next
            self._next += 1
            self._subs[token] = (watched, notify, sig)
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._loop, name="wpeft-runs-watcher",
                                                daemon=True)
                self._thread.start()
        return token

    def unsubscribe(self, token: int) -> None:
        """Stop notifying a subscriber (unknown tokens are ignored: a session ends once)."""
        with self._lock:
            self._subs.pop(token, None)

    def stop(self) -> None:
        """Stop the thread (subscribers stay; a new subscription starts it again)."""
        self._stop.set()

    def check(self) -> int:
        """One pass: notify the subscribers whose runs changed; returns how many."""
        self.checks += 1
        with self._lock:
            subs = list(self._subs.items())
        memo: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[Any, ...]] = {}
        changed = []
        for token, (watched, notify, old) in subs:
            key = watched.key()
            if key not in memo:
                memo[key] = self.catalog.signature(key[0], metrics=key[1])
            if memo[key] != old:
                changed.append(notify)
                with self._lock:
                    if token in self._subs:
                        self._subs[token] = (watched, notify, memo[key])
        for notify in changed:
            try:
                notify()
            except Exception:  # one session's failure must not stop the others
                log.exception("runs watcher: a session's notification failed")
        return len(changed)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # keep watching (e.g. RUNS_DIR briefly unreadable)
                log.exception("runs watcher: check failed")


_CATALOGS: dict[Path, Catalog] = {}
_CATALOGS_LOCK = threading.Lock()


def catalog_for(root: str | os.PathLike[str]) -> Catalog:
    """The shared :class:`Catalog` of ``root`` (one per resolved directory per process)."""
    resolved = check_runs_dir(root)
    with _CATALOGS_LOCK:
        if resolved not in _CATALOGS:
            _CATALOGS[resolved] = Catalog(resolved)
        return _CATALOGS[resolved]
