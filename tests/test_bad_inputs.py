"""Bad input on the command line: one line naming the bad value and the fix, exit code 2, no
traceback, and nothing built or created first. New bad inputs join the table."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from wpeft.cli import main


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only file system (a tmpfs mounted ``ro``; root's permissions do not help there)."""
    path = tmp_path / "ro"
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.decode().strip()}")
    yield path
    subprocess.run(["umount", str(path)], check=False)


@pytest.fixture
def unfinished_run(tmp_path) -> Path:
    """A run directory as a killed run leaves it: config and records, no summary."""
    run = tmp_path / "unfinished"
    (run / "records").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"task": "downscaling", "method": "lora"}))
    return run


TRAIN = ["train", "--steps", "2"]

# (arguments with {tmp} / {file} / {unfinished} / {bad_yaml} / {list_yaml} / {typo_yaml} /
# {corrupt} placeholders, message fragment)
CASES = [
    (TRAIN + ["--task", "nosuch", "--out", "{tmp}/a"], "Unknown task 'nosuch'"),
    (TRAIN + ["--method", "nosuch", "--out", "{tmp}/a"], "Unknown method 'nosuch'"),
    (TRAIN + ["--method", "lora", "--method-option", "rank=abc", "--out", "{tmp}/a"],
     "rank='abc' is not a valid int"),
    (TRAIN + ["--method", "lora", "--method-option", "rnak=4", "--out", "{tmp}/a"],
     "has no setting(s) ['rnak']"),
    (TRAIN + ["--method-option", "rank", "--out", "{tmp}/a"], "'rank' is not KEY=VALUE"),
    (TRAIN + ["--task-option", "surface_weight=heavy", "--out", "{tmp}/a"],
     "surface_weight='heavy' is not a valid float"),
    (TRAIN + ["--device", "banana", "--out", "{tmp}/a"], "not a torch device"),
    (TRAIN + ["--checkpoint-every", "-1", "--out", "{tmp}/a"], "checkpoint_every must be >= 0"),
    (TRAIN + ["--eval-every", "-5", "--out", "{tmp}/a"], "eval_every must be >= 0"),
    (TRAIN + ["--lr", "nan", "--out", "{tmp}/a"], "lr must be a finite number > 0"),
    (TRAIN + ["--budget", "2", "--out", "{tmp}/a"], "budget 2.0 is out of range"),
    (TRAIN, "needs --out RUN_DIR"),
    (TRAIN + ["--out", "{file}"], "is a file, not a directory"),
    (TRAIN + ["--out", "{file}/run"], "is a file, so no directory can be made there"),
    (TRAIN + ["--out", "{unfinished}"], "holds an unfinished run; give --resume"),
    (TRAIN + ["--out", "{unfinished}", "--resume", "--overwrite"], "contradict each other"),
    (TRAIN + ["--out", "{tmp}"], "is not empty and holds no wpeft run"),
    (TRAIN + ["--data", "{tmp}/nosuch.yaml", "--out", "{tmp}/a"],
     "nosuch.yaml: the file does not exist"),
    (TRAIN + ["--data", "{bad_yaml}", "--out", "{tmp}/a"],
     "bad.yaml: not valid YAML (expected ',' or ']', but got ':' at line 2, column 2)"),
    (TRAIN + ["--data", "{list_yaml}", "--out", "{tmp}/a"],
     "list.yaml: the top level is a list, not a mapping of settings"),
    (TRAIN + ["--data", "{typo_yaml}", "--out", "{tmp}/a"], "has no setting(s) ['surfce_weight']"),
    (TRAIN + ["--task-option", "world=3", "--out", "{tmp}/a"],
     "world=3 is not a WorldConfig or a mapping of its fields"),
    (TRAIN + ["--task-option", 'world={{"nlta": 16}}', "--out", "{tmp}/a"],
     "world has no setting(s) ['nlta']"),
    (TRAIN + ["--task-option", "seed=3", "--out", "{tmp}/a"], "give --seed"),
    (TRAIN + ["--backbone", "huge", "--out", "{tmp}/a"], "Unknown backbone 'huge'"),
    (TRAIN + ["--backbone", "1.3b", "--out", "{tmp}/a"], "has no weights shipped with wpeft"),
    (TRAIN + ["--checkpoint", "{tmp}/nosuch.ckpt", "--out", "{tmp}/a"],
     "nosuch.ckpt does not exist; download it once from the Aurora model card"),
    (TRAIN + ["--checkpoint", "{tmp}", "--out", "{tmp}/a"], "is a directory, not a weights file"),
    (TRAIN + ["--checkpoint", "{corrupt}", "--out", "{tmp}/a"],
     "The file is corrupt or not a checkpoint"),
    (["compare", "--root", "{tmp}/c", "--methods", "nosuch"], "Unknown method 'nosuch'"),
    (["compare", "--root", "{tmp}/c", "--seeds", "0"], "number of seeds must be >= 1"),
    (["compare", "--root", "{tmp}/a", "--task-option", "surfce_weight=1"],
     "has no setting(s) ['surfce_weight']; its settings: ['atmos_weight'"),
    (["compare", "--root", "{tmp}/a", "--data", "{list_yaml}"], "the top level is a list"),
    (["compare", "--root", "{tmp}/a", "--checkpoint", "{tmp}/nosuch.ckpt"], "does not exist"),
    (["compare", "--root", "{tmp}/a", "--checkpoint", "{corrupt}"], "corrupt or not a checkpoint"),
    (["figures", "{tmp}/nosuch", "--out", "{tmp}/figs"], "does not exist"),
    (["figures", "{unfinished}", "--out", "{tmp}/figs"], "nothing to draw"),
]


def _fill(args: list[str], tmp: Path, unfinished: Path) -> list[str]:
    files = {
        "file": ("a-file", "not a directory"),
        "bad_yaml": ("bad.yaml", "a: [1, 2\nb: 3\n"),
        "list_yaml": ("list.yaml", "- surface_weight\n- 0.5\n"),
        "typo_yaml": ("typo.yaml", "surfce_weight: 0.5\n"),
        "corrupt": ("corrupt.safetensors", "not a safetensors file"),
    }
    paths = {}
    for key, (name, text) in files.items():
        paths[key] = tmp / name
        paths[key].write_text(text)
    return [a.format(tmp=tmp, unfinished=unfinished, **paths) for a in args]


@pytest.mark.parametrize(("args", "fragment"), CASES, ids=[" ".join(c[0][:6]) for c in CASES])
def test_bad_input_is_one_line_and_exit_2(args, fragment, tmp_path, unfinished_run, capsys) -> None:
    argv = _fill(args, tmp_path, unfinished_run)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err, err
    assert "Traceback" not in err and err.startswith("wpeft: error: ") and err.count("\n") == 1
    assert not (tmp_path / "a").exists(), "a refused run must not create its folder"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: --device cuda is valid")
def test_cuda_without_a_gpu(tmp_path, capsys) -> None:
    assert main(TRAIN + ["--device", "cuda", "--out", str(tmp_path / "a")]) == 2
    assert "no CUDA GPU is visible; use --device cpu or auto" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_read_only_out_is_refused_before_anything_is_built(read_only_dir, capsys) -> None:
    assert main(TRAIN + ["--out", str(read_only_dir / "run")]) == 2
    err = capsys.readouterr().err
    assert "is not writable (read-only file system or permissions)" in err
    assert "Traceback" not in err


def test_figures_into_a_read_only_folder(read_only_dir, unfinished_run, capsys) -> None:
    assert main(["figures", str(unfinished_run), "--out", str(read_only_dir / "figs")]) == 2
    err = capsys.readouterr().err
    assert "Read-only file system" in err and "check the path and its permissions" in err
    assert "Traceback" not in err and err.count("\n") == 1
