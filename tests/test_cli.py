"""The command line: user mistakes give one line and exit status 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

from conftest import cli


def test_help_lists_commands():
    out = cli("--help", check=0).stdout
    for command in ("phantom", "ingest", "preprocess"):
        assert command in out


def test_user_errors_are_one_line(tmp_path):
    cases = [
        (["ingest", "--store", str(tmp_path / "v.zarr")], "give exactly one of --bids DIR or --manifest FILE.csv"),
        (["ingest", "--store", str(tmp_path / "v.zarr"), "--bids", str(tmp_path / "nope")], "not a directory"),
        (["ingest", "--store", str(tmp_path / "v.zarr"), "--manifest", str(tmp_path / "nope.csv")], "no such manifest"),
        (["preprocess", "--store", str(tmp_path / "empty.zarr")], "not a volume store"),
        (["phantom", "--out", str(tmp_path / "p"), "--subjects", "1"], "at least 2 subjects"),
        (["ingest", "--store", __file__, "--manifest", str(tmp_path / "one.csv")], "a file, not a volume store"),
        (["sql", "SELECT 1", "--format", "csv", "--out", str(tmp_path / "no" / "x.csv")], "its folder does not exist"),
    ]
    params = str(Path(__file__).parents[1] / "params.yaml")
    cases += [
        (["train", "nosuch", "--epochs", "1", "--params", params], "nosuch: no such model"),
        (["train", "cnn3d", "--folds", "1", "--params", params], "folds 1: cross-validation needs at least 2"),
    ]
    (tmp_path / "cols.csv").write_text("subject,file\na,b\n")
    (tmp_path / "one.csv").write_text("subject_id,path\na,a.nii.gz\n")
    cases.append((["ingest", "--store", str(tmp_path / "v.zarr"), "--manifest", str(tmp_path / "cols.csv")], "missing column(s) path, subject_id"))
    for args, words in cases:
        proc = cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in proc.stderr, (args, proc.stderr)
