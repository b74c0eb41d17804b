"""Shared fixtures: a tiny phantom cohort (real files, real stores) built once per test session."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest

from endopheno.params import load_params

ROOT = Path(__file__).resolve().parents[1]


def small_params(subjects: int = 6) -> dict:
    """The repository's phantom params with a small genome, so a cohort builds in seconds."""
    p = copy.deepcopy(load_params("phantom", ROOT / "params.yaml"))
    p["subjects"] = subjects
    p["genetics"].update(chromosomes=2, chromosome_length_mb=1.0, extra_genotyped_samples=1, ungenotyped_subjects=1,
                         causal=p["genetics"]["causal"][:2])
    return p


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    from endopheno.phantom import generate

    out = tmp_path_factory.mktemp("phantom") / "cohort"
    generate(out, small_params(6), workers=1)
    return out


@pytest.fixture(scope="session")
def ingested_store(phantom_dir, tmp_path_factory) -> Path:
    """A volume store with the phantom's native volumes (treat as read-only; copy it to modify)."""
    from endopheno.volumes.ingest import ingest, inputs_from_bids

    store = tmp_path_factory.mktemp("stores") / "volumes.zarr"
    inputs, rejected = inputs_from_bids(phantom_dir / "bids")
    report = ingest(inputs, store, rejected=rejected, workers=1)
    assert not report.rejected and len(report.ingested) == 6
    return store


@pytest.fixture(scope="session")
def preprocessed_store(ingested_store, tmp_path_factory) -> Path:
    """The ingested store preprocessed as `endopheno preprocess` does it: MNI volumes and log-Jacobian maps."""
    from endopheno.volumes.morphometry import morphometry
    from endopheno.volumes.preprocess import PreprocessParams, preprocess

    store = tmp_path_factory.mktemp("prep") / "volumes.zarr"
    shutil.copytree(ingested_store, store)
    report = preprocess(store, PreprocessParams(), workers=1)
    assert len(report.processed) == 6 and not report.failed
    assert len(morphometry(store, workers=1)) == 6
    return store


def cli(*args: str, user: str | None = None, cwd: Path | None = None, check: int | None = None):
    """Run the installed `endopheno` console script; return the CompletedProcess."""
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("endopheno")
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, user=user,
                          env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})
    if check is not None:
        assert proc.returncode == check, proc.stderr
    return proc
