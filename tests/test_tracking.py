"""The MLflow record: runs of a moved or copied project write beside its own sqlite store."""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow

from endopheno.tracking import mlflow_run


def _run_with_a_file(db: Path, text: str) -> Path:
    with mlflow_run("endopheno.test", "run", uri=f"sqlite:///{db}") as run:
        mlflow.log_text(text, "note.txt")
    return Path(unquote(urlparse(mlflow.get_run(run.info.run_id).info.artifact_uri).path))


def test_a_copied_project_writes_its_new_runs_into_its_own_artifact_folder(tmp_path):
    first = _run_with_a_file(tmp_path / "a" / "stores" / "mlflow.db", "original")
    assert first.is_relative_to(tmp_path / "a" / "stores" / "mlartifacts") and (first / "note.txt").exists()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    before = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*"))
    second = _run_with_a_file(tmp_path / "b" / "stores" / "mlflow.db", "copy")
    assert second.is_relative_to(tmp_path / "b" / "stores" / "mlartifacts"), second
    assert (second / "note.txt").read_text() == "copy"
    assert sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*")) == before  # the original untouched
