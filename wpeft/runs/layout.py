"""The layout of a run directory: every file name in one place.

::

    <run>/config.json            the TrainConfig (written first: the directory is a run)
    <run>/task-statistics.json   the task's training-period statistics (read again on resume)
    <run>/metrics.jsonl          one JSON line per evaluation (appended while training)
    <run>/checkpoint.pt          the last checkpoint (what ``resume`` continues from)
    <run>/adapter.safetensors    the trained adapter (+ adapter.json; stem ``adapter``)
    <run>/fields.nc              test predictions and targets
    <run>/summary.json           written last: the run is finished
    <run>/records/<kind>/        append-only records (:class:`wpeft.runs.store.RecordStore`)
        index.json               the complete chunks, in step order
    <run>/records/fisher/masks/  the Fisher recorder's mask history (resume state)

The training loop writes through :class:`RunLayout`; :mod:`wpeft.runs.store` and the dashboard
(:mod:`wpeft.app.catalog`) read through it, and :func:`run_directories` is the one walk that
finds run directories. :func:`read_json` is the one reader of a run's JSON files: a file that
cannot be read raises :class:`RunFileError` with a one-line reason, which the readers report as
a problem of that run only (:attr:`wpeft.runs.Run.problem`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wpeft.errors import DataError

__all__ = [
    "ADAPTER_STEM",
    "CHECKPOINT",
    "CONFIG",
    "FIELDS",
    "FISHER_MASKS",
    "MAX_JSON_BYTES",
    "METRICS",
    "RECORDS_DIR",
    "RECORD_INDEX",
    "RECORD_KINDS",
    "SKIP_DIRS",
    "SUMMARY",
    "TASK_STATISTICS",
    "RunFileError",
    "RunLayout",
    "names_a_run",
    "partial",
    "read_json",
    "read_json_object",
    "run_directories",
]

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
TASK_STATISTICS = "task-statistics.json"
FIELDS = "fields.nc"
#: The adapter's file stem (:func:`wpeft.methods.adapter_file.save_adapter` adds the suffixes).
ADAPTER_STEM = "adapter"
#: Sub-directory of a run directory holding the record kinds.
RECORDS_DIR = "records"
RECORD_INDEX = "index.json"
#: The record kinds the recorders write.
RECORD_KINDS = ("fisher", "attention")
FISHER_MASKS = "masks"
#: Directory names never descended into when looking for runs.
SKIP_DIRS = frozenset({RECORDS_DIR, "__pycache__", ".git", ".ipynb_checkpoints"})
#: Largest JSON file of a run directory that is read (bytes).
MAX_JSON_BYTES = 4 * 1024 * 1024


def partial(path: Path) -> Path:
    """Where ``path`` is written before :func:`os.replace` moves it in place (``<name>.tmp``)."""
    return path.with_name(path.name + ".tmp")


class RunFileError(DataError):
    """A file of a run directory that cannot be read.

    Attributes:
        name: The file relative to its run directory (``config.json``,
            ``records/fisher/index.json``).
        reason: What is wrong, e.g. ``is not valid JSON (Expecting value at line 1, column 1)``.
        brief: ``"<name> <reason>"``: one line, without the run's path.
    """

    def __init__(self, name: str, reason: str, path: Path | None = None) -> None:
        super().__init__(f"{path if path is not None else name} {reason}")
        self.name = name
        self.reason = reason

    @property
    def brief(self) -> str:
        return f"{self.name} {self.reason}"


def read_json(path: Path, name: str | None = None) -> Any:
    """The JSON value in ``path``; None if the file does not exist.

    Args:
        path: The file.
        name: How messages call it (default: the file name).

    Raises:
        RunFileError: the file is unreadable, larger than :data:`MAX_JSON_BYTES`, not UTF-8
            text or not valid JSON.
    """
    name = name or path.name
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise RunFileError(name, f"is larger than {MAX_JSON_BYTES} bytes; not read", path)
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RunFileError(name, f"cannot be read ({e.strerror or type(e).__name__})", path) from e
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RunFileError(name, f"is not UTF-8 text (bad byte at offset {e.start})", path) from e
    except json.JSONDecodeError as e:
        reason = f"is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
        raise RunFileError(name, reason, path) from e


def read_json_object(path: Path, name: str | None = None) -> dict[str, Any] | None:
    """:func:`read_json` of a file that must hold a JSON object (None if it does not exist)."""
    value = read_json(path, name)
    if value is None or isinstance(value, dict):
        return value
    kind = "a list" if isinstance(value, list) else f"a {type(value).__name__}"
    raise RunFileError(name or path.name, f"holds {kind}, not a JSON object", path)


def names_a_run(config: Any) -> bool:
    """Whether a ``config.json`` value is a run's: an object naming a task and a method."""
    return isinstance(config, dict) and {"task", "method"} <= config.keys()


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory (nothing is created or read on construction).

    Args:
        path: The run directory.
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # --- files ------------------------------------------------------------------------------

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def task_statistics(self) -> Path:
        return self.path / TASK_STATISTICS

    @property
    def fields(self) -> Path:
        return self.path / FIELDS

    @property
    def adapter(self) -> Path:
        """The adapter's stem (``adapter``; its files are ``.safetensors`` and ``.json``)."""
        return self.path / ADAPTER_STEM

    @property
    def records(self) -> Path:
        return self.path / RECORDS_DIR

    def record_dir(self, kind: str) -> Path:
        """``records/<kind>/``, the chunks of one record kind."""
        return self.records / kind

    def record_index(self, kind: str) -> Path:
        """``records/<kind>/index.json``."""
        return self.record_dir(kind) / RECORD_INDEX

    @property
    def fisher_masks(self) -> Path:
        """``records/fisher/masks/``, the Fisher recorder's mask history."""
        return self.record_dir("fisher") / FISHER_MASKS

    @property
    def read_files(self) -> tuple[Path, ...]:
        """The files readers open: config, summary, metrics, fields and the record indexes."""
        kinds = sorted({*RECORD_KINDS, *self.record_kinds})
        return (self.config, self.summary, self.metrics, self.fields,
                *(self.record_index(kind) for kind in kinds))

    # --- state ------------------------------------------------------------------------------

    @property
    def has_config(self) -> bool:
        return self.config.is_file()

    @property
    def finished(self) -> bool:
        """``summary.json`` exists (it is written last)."""
        return self.summary.is_file()

    @property
    def has_fields(self) -> bool:
        return self.fields.is_file()

    def has_records(self, kind: str) -> bool:
        return self.record_index(kind).is_file()

    @property
    def has_run_files(self) -> bool:
        """Files only training writes exist (metrics, checkpoint, summary, fields, task
        statistics, records)."""
        files = (self.metrics, self.checkpoint, self.summary, self.fields, self.task_statistics)
        return any(p.is_file() for p in files) or self.records.is_dir()

    @property
    def record_kinds(self) -> tuple[str, ...]:
        """The record kinds present (sub-directories of ``records/`` with an index), sorted."""
        if not self.records.is_dir():
            return ()
        return tuple(sorted(d.name for d in self.records.iterdir() if (d / RECORD_INDEX).is_file()))

    @property
    def is_run(self) -> bool:
        """A run directory: ``config.json`` names a task and a method, or it does not (it is
        damaged) but the directory holds files only training writes. Other ``config.json``
        files (e.g. of cached data) are not runs."""
        if not self.has_config:
            return False
        try:
            if names_a_run(read_json(self.config)):
                return True
        except RunFileError:
            pass
        return self.has_run_files


def run_directories(root: str | Path) -> list[Path]:
    """Directories under ``root`` (any depth, ``root`` included) holding a ``config.json``,
    sorted by path; directory symlinks and :data:`SKIP_DIRS` are not descended into. Whether
    each is a run is :attr:`RunLayout.is_run`."""
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        if CONFIG in filenames:
            found.append(Path(dirpath))
    return sorted(found, key=lambda p: p.relative_to(root).parts)
