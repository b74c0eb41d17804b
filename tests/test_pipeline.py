"""The DVC pipeline on a fresh clone with a tiny cohort: `dvc repro` builds every output (models
trained and registered, feature sets extracted, attribution, the catalog showing them, a GWAS per
feature set, the validation metrics and the report), every SQL query of the README runs on its catalog,
a second `dvc repro` does nothing, and an experiment changing one GWAS parameter reruns only the GWAS
and what follows it."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import xarray as xr

from conftest import ROOT, small_params


def readme_sql(readme: str) -> list[list[str]]:
    """The README's `endopheno sql` command lines, and each statement of its ```sql blocks as one."""
    commands = [shlex.split(line, comments=True) for line in re.findall(r"^endopheno sql .*$", readme, re.M)]
    for block in re.findall(r"^```sql\n(.*?)^```", readme, re.S | re.M):
        code = "\n".join(line for line in block.splitlines() if not line.lstrip().startswith("--"))
        commands += [["endopheno", "sql", statement.strip()] for statement in code.split(";") if statement.strip()]
    return commands


@pytest.mark.slow
def test_dvc_repro_on_a_fresh_clone(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    # Uncommitted work is part of what is tested: copy the working tree's tracked files over the clone.
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (clone / f).parent.mkdir(parents=True, exist_ok=True)
            (clone / f).write_bytes(src.read_bytes())
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["phantom"] = {**small_params(16), "out": "data/phantom", "workers": 1}
    params["ingest"]["workers"] = params["preprocess"]["workers"] = 1
    # tiny models on an 8 mm grid, 2 folds: the stages run, not the science
    params["train"].update(folds=2, resolution_mm=8.0, loader_workers=0, threads=1)
    tiny = {"epochs": 2, "patience": 2, "batch_size": 4}
    params["train"]["models"]["cnn3d"].update(options={"widths": [4, 8], "kernels": [3, 3], "hidden": 8}, **tiny)
    # the default parcel bottleneck, narrow
    params["train"]["models"]["autoencoder3d"].update(options={**params["train"]["models"]["autoencoder3d"]["options"],
                                                               "widths": [4]}, **tiny)
    params["extract"]["loader_workers"] = 0
    params["attribute"].update(subjects=4, randomisation_subjects=2, batch_size=4, ig_steps=8, ig_max_steps=16,
                               subject_maps=False)
    # 16 samples: few PCs and covariates, so each regression keeps residual degrees of freedom
    params["genotypes"]["pca"]["pcs"] = 2
    params["catalog"]["covariates"] = ["age", "sex", "etiv_mm3"]
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run = subprocess.run(["dvc", "repro"], cwd=clone, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    ds = xr.open_zarr(clone / "stores" / "volumes.zarr", group="mni")
    assert ds["T1w"].shape[0] == 16 and ds["qc_pass"].values.all()
    assert (clone / "stores" / "qc" / "montage.png").exists()
    assert (clone / "data" / "phantom" / "genotypes" / "phantom.bed").exists()
    metrics = subprocess.run(["dvc", "metrics", "show"], cwd=clone, env=env, capture_output=True, text=True).stdout
    assert "stores/models/cnn3d/metrics.json" in metrics and "balanced_accuracy_mean" in metrics
    import duckdb

    con = duckdb.connect(str(clone / "stores" / "catalog.duckdb"), read_only=True)
    os.chdir(clone)   # the catalog's views hold paths relative to the repository root
    try:
        for name, model in (("ae_t1", "endopheno.autoencoder3d"), ("ae_t1_random", "endopheno.autoencoder3d_untrained"),
                            ("cnn3d_t1", "endopheno.cnn3d")):
            rows, models = con.sql(f"SELECT count(*), any_value(model_name) FROM features.{name}").fetchall()[0]
            assert rows == 16 and models == model
        assert con.sql("SELECT count(*) FROM features.ae_t1 WHERE f127 IS NOT NULL").fetchall()[0][0] == 16
        # The catalog shows the results of the stages before it: every GWAS, with its lineage.
        runs = {r[0] for r in con.sql("SELECT DISTINCT run FROM gwas.results").fetchall()}
        assert runs == {"atlas_regions", "ae_t1", "cnn3d_t1", "ae_t1_random"}, runs
        assert con.sql("SELECT count(*) FROM meta.lineage WHERE gwas_run_id IS NOT NULL AND feature_set_version IS NOT NULL"
                       ).fetchall()[0][0] == 4
    finally:
        os.chdir(ROOT)
    con.close()
    # What the README tells a new user to type must work on what `dvc repro` built.
    queries = readme_sql((clone / "README.md").read_text())
    assert len(queries) >= 8
    for argv in queries:
        done = subprocess.run(argv, cwd=clone, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"README: {shlex.join(argv)}\n{done.stdout}{done.stderr}"
    validation = json.loads((clone / "stores" / "validation" / "validation.json").read_text())
    assert set(validation["feature_sets"]) == {"atlas_regions", "ae_t1", "cnn3d_t1", "ae_t1_random"}
    assert all(s["planted"] == 2 for s in validation["feature_sets"].values())
    assert "stores/validation/metrics.json" in metrics
    report = json.loads((clone / "stores" / "report" / "report.json").read_text())
    assert report["sections"]["validation"]["status"] == "present" and report["figures"]
    assert (clone / "stores" / "attribution" / "cnn3d" / "scores.tsv").exists()

    again = subprocess.run(["dvc", "repro"], cwd=clone, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "didn't change" in again.stdout + again.stderr and "Running stage" not in again.stdout
    status = subprocess.run(["dvc", "status"], cwd=clone, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout

    # The user's next step: commit the run (its dvc.lock), then try a variant as an experiment.
    subprocess.run(["git", "add", "-A"], cwd=clone, check=True)
    subprocess.run(["git", "-c", "user.name=endopheno tests", "-c", "user.email=tests@endopheno.invalid", "commit", "-qm",
                    "the tiny cohort's run"], cwd=clone, check=True)
    # One GWAS knob: the four scans, the catalog that shows them, validation and report rerun; nothing upstream does.
    exp = subprocess.run(["dvc", "exp", "run", "-S", "gwas.transform=inverse_normal"], cwd=clone, env=env,
                         capture_output=True, text=True)
    assert exp.returncode == 0, exp.stdout + exp.stderr
    ran = set(re.findall(r"Running stage '([^']+)'", exp.stdout))
    assert ran == {"gwas@atlas_regions", "gwas@ae_t1", "gwas@cnn3d_t1", "gwas@ae_t1_random", "catalog", "validate",
                   "report"}, ran
    shown = subprocess.run(["dvc", "exp", "show", "--csv"], cwd=clone, env=env, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    # The experiment's row carries its own metrics (not a metric file missing from its commit), beside main's.
    rows = {r["Experiment"] or r["rev"]: r for r in csv.DictReader(io.StringIO(shown.stdout))}
    experiment = next(r for name, r in rows.items() if name not in ("workspace", "main"))
    assert experiment["gwas.transform"] == "inverse_normal" and rows["main"]["gwas.transform"] == "none"
    for row in (experiment, rows["main"]):
        assert row["atlas_regions.found"] not in ("", "!") and row["balanced_accuracy_mean"] not in ("", "!"), row


def test_a_pipeline_run_from_a_clean_commit_is_not_called_dirty(tmp_path):
    """`dvc repro` rewrites dvc.lock after each stage: that alone must not mark the code as changed,
    while an edited tracked file, anywhere in the tree, must."""
    from endopheno.tracking import git_revision

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "sub").mkdir()
    for name in ("dvc.lock", "params.yaml", "sub/dvc.lock"):
        (tmp_path / name).write_text("a\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    clean = git_revision(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{40}", clean)
    (tmp_path / "dvc.lock").write_text("b\n")
    (tmp_path / "sub" / "dvc.lock").write_text("b\n")
    assert git_revision(tmp_path) == clean and git_revision(tmp_path / "sub") == clean
    (tmp_path / "params.yaml").write_text("b\n")
    assert git_revision(tmp_path) == clean + "-dirty" and git_revision(tmp_path / "sub") == clean + "-dirty"
