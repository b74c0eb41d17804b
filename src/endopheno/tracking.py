"""MLflow, the project's record of every model, version and association run.

The tracking store is sqlite (``sqlite:///stores/mlflow.db`` by default: MLflow ≥ 3.13 refuses the plain
``./mlruns`` file store) with artifacts under ``stores/mlartifacts``; ``MLFLOW_TRACKING_URI`` overrides
it. Every run is tagged with the git revision it ran from.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

DEFAULT_URI = "sqlite:///stores/mlflow.db"
log = logging.getLogger(__name__)


def tracking_uri(uri: str | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def local_artifacts(uri: str) -> Path:
    """The folder of a local artifact URI (``file:///…``), found again if the project has moved.

    MLflow records artifact locations as absolute paths (mlflow/mlflow#3144, open), so a project folder
    that was moved or copied keeps pointing at the old place. Then the part after ``mlartifacts/`` is
    looked up beside the current sqlite store, where `mlflow_run` puts every artifact."""
    from urllib.parse import unquote, urlparse

    import mlflow

    path = Path(unquote(urlparse(uri).path)) if uri.startswith("file:") else Path(uri)
    if path.exists() or "mlartifacts" not in path.parts:
        return path
    current = mlflow.get_tracking_uri()
    if current.startswith("sqlite:///"):
        inside = path.parts[len(path.parts) - path.parts[::-1].index("mlartifacts"):]
        moved = Path(current.removeprefix("sqlite:///")).parent / "mlartifacts" / Path(*inside)
        if moved.exists():
            log.info("artifacts recorded at %s read from %s (the project has moved)", path, moved)
            return moved
    return path


def git_revision(cwd: str | Path = ".") -> str:
    """The commit checked out, with ``-dirty`` when tracked files differ from it; "unknown" outside git.

    A ``dvc.lock`` is not counted: `dvc repro` rewrites it after every stage, so every stage after the
    first of a run from a clean commit would otherwise call that commit's code dirty."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude,glob)**/dvc.lock"],
                               cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextlib.contextmanager
def mlflow_run(experiment: str, run_name: str, *, uri: str | None = None, tags: dict | None = None,
               run_id: str | None = None) -> Iterator:
    """Start an MLflow run in `experiment` (created with its artifacts beside the sqlite store), or
    continue run `run_id` (a resumed training)."""
    import mlflow

    for noisy in ("mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    uri = tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        artifacts = (db.parent / "mlartifacts" / experiment).resolve().as_uri()
    else:
        artifacts = None
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else mlflow.create_experiment(experiment, artifact_location=artifacts)
    if found and artifacts and found.artifact_location != artifacts and found.artifact_location.startswith("file:"):
        _move_artifact_location(db, experiment_id, found.artifact_location, artifacts)
    if run_id is not None:
        try:
            mlflow.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            run_id = None   # the tracking store was reset since: start afresh
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id, run_name=None if run_id else run_name,
                          tags={"git_revision": git_revision(), **(tags or {})}) as run:
        yield run


def _move_artifact_location(db: Path, experiment_id: str, old: str, new: str) -> None:
    """Point an experiment of a moved or copied project at the artifact folder beside its sqlite store.

    MLflow records an experiment's artifact location as an absolute path and has no API to change it
    (mlflow/mlflow#3144), so without this every new run of a copied project would write its models into
    the original project's folder. Only new runs follow; what older runs recorded is found again by
    `local_artifacts`."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as con, con:
        con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (new, int(experiment_id)))
    log.info("experiment %s: artifacts recorded at %s, now written beside %s (the project has moved)", experiment_id, old, db)
