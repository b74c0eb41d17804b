"""The feature store on a tiny real cohort: Delta versions with provenance, time travel, refusal of
silent schema changes, concurrent writers and a killed writer, the DuckDB catalog (also read by a
plain duckdb connection from a fresh process), `endopheno sql`, the cohort join and lineage."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pytest
import yaml
from deltalake import DeltaTable

from conftest import ROOT, cli
from endopheno.errors import InputError
from endopheno.featurestore.store import SchemaChangeError, history, open_table, write_version

PROVENANCE = {"git_revision": "abc", "mlflow_run_id": "r", "model_name": "m", "model_version": "1",
              "volume_store_digest": "d", "params_hash": "p", "schema_version": 1}


@pytest.fixture(scope="module")
def repo(phantom_dir, preprocessed_store, tmp_path_factory) -> Path:
    """A repository root with the atlas definition, params, a genotype store, QC table and MLflow
    store, the atlas set built twice (producer version 1, then 2) and the catalog built."""
    from endopheno.genotypes.importer import ImportParams, import_genotypes
    from endopheno.genotypes.pca import PCAParams
    from endopheno.genotypes.sources import BedSource
    from endopheno.volumes.preprocess import open_mni
    from endopheno.volumes.qc import qc_table

    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(ROOT / "features", root / "features")
    (root / "stores" / "qc").mkdir(parents=True)
    qc_table(open_mni(preprocessed_store)).to_csv(root / "stores" / "qc" / "qc.tsv", sep="\t", index=False)
    import_genotypes(BedSource(phantom_dir / "genotypes" / "phantom"), root / "stores" / "genotypes" / "phantom",
                     ImportParams(pca=PCAParams(pcs=3)))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["features"].update(volumes=str(preprocessed_store), workers=1, tracking_uri="sqlite:///stores/mlflow.db",
                              atlas=None)   # the geometric lobes: their volumes must add up to the brain's
    params["catalog"].update(participants=str(phantom_dir / "bids" / "participants.tsv"))
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    definition = root / "features" / "atlas_regions.yaml"
    producer_version = re.compile(r'\n  version: "\d+"')
    definition.write_text(producer_version.sub('\n  version: "1"', definition.read_text()))
    cli("features", "build", "atlas_regions", cwd=root, check=0)
    definition.write_text(producer_version.sub('\n  version: "2"', definition.read_text()))
    time.sleep(0.05)
    cli("features", "build", "atlas_regions", cwd=root, check=0)
    cli("catalog", cwd=root, check=0)
    return root


def test_atlas_set_has_two_versions_with_provenance_and_time_travel(repo, preprocessed_store):
    import mlflow

    path = repo / "stores" / "features" / "atlas_regions"
    rerun = cli("features", "build", "atlas_regions", cwd=repo, check=0)
    assert "unchanged" in rerun.stderr
    versions = history(path)
    assert [v["version"] for v in versions] == [0, 1]                      # the rerun made no version
    assert [v["model_version"] for v in versions] == ["1", "2"]
    assert versions[0]["volume_store_digest"] == versions[1]["volume_store_digest"]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{repo}/stores/mlflow.db")
    for v in versions:
        assert client.get_run(v["mlflow_run_id"]).data.tags["feature_set_version"] == str(v["version"])
    old = open_table(path, version=0).to_pandas()
    assert set(old.model_version) == {"1"} and set(open_table(path).to_pandas().model_version) == {"2"}
    between = versions[0]["timestamp"] + (versions[1]["timestamp"] - versions[0]["timestamp"]) / 2
    assert set(open_table(path, as_of=between.isoformat()).to_pandas().model_version) == {"1"}

    # Plausible measurements: 6 subjects, positive native volumes, lobes add up to at most the brain.
    assert len(old) == 6 and old.session.isna().all()
    for kind in ("volume_mm3", "tbm_volume_mm3"):   # grey matter; everything, by the log-Jacobian maps
        volumes = old.filter(regex=f"(?<!tbm)_{kind}$" if kind == "volume_mm3" else f"_{kind}$")
        assert (volumes > 0).all().all()
        whole = old[f"whole_brain_{kind}"]
        lobes = volumes.drop(columns=f"whole_brain_{kind}").sum(axis=1)
        assert ((lobes <= whole * (1 + 1e-9)) & (lobes > 0.9 * whole)).all()
    assert 3e5 < old.whole_brain_volume_mm3.median() < 1.5e6
    assert (old.whole_brain_tbm_volume_mm3 > 1.2 * old.whole_brain_volume_mm3).all()   # grey matter is part of it
    assert old.filter(like="_mean_t1").abs().max().max() < 3

    history_out = cli("features", "history", "atlas_regions", cwd=repo, check=0).stdout
    assert versions[1]["mlflow_run_id"][:8] in history_out and "volume_store_digest" in history_out
    assert "whole_brain_volume_mm3" not in cli("features", "list", cwd=repo, check=0).stdout
    assert "{region}_volume_mm3" in cli("features", "show", "atlas_regions", cwd=repo, check=0).stdout


def test_the_phantom_atlas_lands_on_the_store_grid(phantom_dir, preprocessed_store):
    """The phantom's atlas (1 mm label image + index/name table) resampled to the 2 mm store: every region
    keeps its name and about its template volume; a region named like a measurement is refused."""
    from endopheno.featurestore.atlas import atlas_from_files
    from endopheno.phantom.regions import REGIONS
    from endopheno.volumes.preprocess import open_mni

    ds = open_mni(preprocessed_store)
    affine = np.asarray(ds.attrs["affine"])
    atlas = atlas_from_files(phantom_dir / "atlas" / "regions.nii.gz", phantom_dir / "atlas" / "regions.tsv",
                             ds.brain_mask.shape, affine)
    assert atlas.names == tuple(r.name for r in REGIONS)
    truth = pd.read_csv(phantom_dir / "ground_truth" / "regions.tsv", sep="\t").set_index("region")
    voxel = abs(np.linalg.det(affine[:3, :3]))
    for k, name in enumerate(atlas.names, start=1):
        assert abs((atlas.labels == k).sum() * voxel / truth.loc[name, "template_volume_mm3"] - 1) < 0.25
    bad = phantom_dir.parent / "bad_regions.tsv"
    bad.write_text("index\tname\n1\twhole_brain\n")
    with pytest.raises(InputError, match="reserved"):
        atlas_from_files(phantom_dir / "atlas" / "regions.nii.gz", bad, ds.brain_mask.shape, affine)


def test_grey_matter_volume_tracks_the_truth(repo, phantom_dir):
    """The phantom's hippocampi shrink with AD: the temporal lobes' grey matter must be smaller in AD
    than in CN on average, relative to the whole brain (truth read by the test only)."""
    table = open_table(repo / "stores" / "features" / "atlas_regions").to_pandas().set_index("subject_id")
    truth = pd.read_csv(phantom_dir / "ground_truth" / "subjects.tsv", sep="\t")
    truth["subject_id"] = truth.iloc[:, 0].astype(str).str.removeprefix("sub-")
    measured = table["whole_brain_volume_mm3"]
    true_brain = truth.set_index("subject_id").filter(like="volume").sum(axis=1).reindex(measured.index)
    assert np.corrcoef(measured, true_brain)[0, 1] > 0  # head size and atrophy move both the same way


def test_identical_inputs_make_no_new_version_and_schema_change_needs_a_bump(tmp_path):
    path = tmp_path / "set"
    t = pa.table({"subject_id": ["a", "b"], "x": [1.0, 2.0]})
    assert write_version(path, t, {**PROVENANCE, "input_digest": "1"}).version == 0
    again = write_version(path, t, {**PROVENANCE, "input_digest": "1"})
    assert (again.version, again.created) == (0, False)
    assert write_version(path, t, {**PROVENANCE, "input_digest": "2"}).version == 1
    changed = pa.table({"subject_id": ["a"], "x": [1.0], "y": [3.0]})
    with pytest.raises(SchemaChangeError, match="schema_version is still 1"):
        write_version(path, changed, {**PROVENANCE, "input_digest": "3"})
    retyped = pa.table({"subject_id": ["a"], "x": ["1"]})
    with pytest.raises(SchemaChangeError, match="x"):
        write_version(path, retyped, {**PROVENANCE, "input_digest": "3"})
    assert DeltaTable(str(path)).version() == 1
    bumped = write_version(path, changed, {**PROVENANCE, "schema_version": 2, "input_digest": "3"})
    assert bumped.version == 2 and open_table(path).to_pyarrow_table().column_names == ["subject_id", "x", "y"]
    assert open_table(path, version=1).to_pyarrow_table().column_names == ["subject_id", "x"]


WRITER = textwrap.dedent("""
    import sys, pyarrow as pa
    from endopheno.featurestore.store import write_version
    path, tag, n, rows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    prov = {"git_revision": "g", "mlflow_run_id": tag, "model_name": "m", "model_version": "1",
            "volume_store_digest": "d", "params_hash": "p", "schema_version": 1}
    for i in range(n):
        t = pa.table({"subject_id": [f"s{j}" for j in range(rows)], "x": [float(i)] * rows, "writer": [tag] * rows})
        r = write_version(path, t, {**prov, "input_digest": sys.argv[5] if len(sys.argv) > 5 else f"{tag}{i}"}, attempts=50)
        print(r.version, r.created, flush=True)
""")


def _writers(path: Path, *argvs: list[str]) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), *a], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for a in argvs]
    return [subprocess.CompletedProcess(p.args, p.wait(120), *p.communicate()) for p in procs]


def test_two_processes_writing_at_once_both_land(tmp_path):
    path = tmp_path / "set"
    runs = _writers(path, ["A", "8", "50"], ["B", "8", "50"])
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    versions = history(path)
    assert len(versions) == 16 and [v["version"] for v in versions] == list(range(16))
    assert sorted(v["input_digest"] for v in versions) == sorted([f"A{i}" for i in range(8)] + [f"B{i}" for i in range(8)])
    for v in versions:  # every version is one writer's whole table, never a mixture
        t = open_table(path, version=v["version"]).to_pandas()
        assert len(t) == 50 and t.writer.nunique() == 1 and t.writer.iloc[0] == v["mlflow_run_id"]
    # Both writing the same inputs at once: one version, not two.
    same = _writers(tmp_path / "same", ["A", "1", "50", "X"], ["B", "1", "50", "X"])
    assert all(r.returncode == 0 for r in same)
    assert len(history(tmp_path / "same")) == 1


CRASHER = textwrap.dedent("""
    import sys, numpy as np, pyarrow as pa
    from endopheno.featurestore.store import write_version
    rows = 2_000_000
    t = pa.table({"subject_id": pa.array(np.arange(rows).astype(str)), "x": np.random.default_rng(0).random(rows),
                  "writer": ["second"] * rows})
    print("writing", flush=True)
    write_version(sys.argv[1], t, {"git_revision": "g", "mlflow_run_id": "r", "model_name": "m", "model_version": "1",
                                   "volume_store_digest": "d", "params_hash": "p", "schema_version": 1, "input_digest": "1"})
""")


def test_a_writer_killed_mid_write_leaves_the_previous_version(tmp_path):
    """SIGKILL a writer as soon as its data file appears on disk, and at increasing delays after it
    starts: every time the table reads as either the old version or the complete new one, and the
    kill at the first sight of the data file lands mid-write (files that no version references)."""
    mid_write = 0
    for k, delay in enumerate((None, 0.0, 0.05, 0.1, 0.2, 0.4)):
        path = tmp_path / f"set{k}"
        write_version(path, pa.table({"subject_id": ["a"], "x": [1.0], "writer": ["first"]}), {**PROVENANCE, "input_digest": "0"})
        before = set(os.listdir(path))
        proc = subprocess.Popen([sys.executable, "-c", CRASHER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
        if delay is None:
            deadline = time.time() + 30
            while set(os.listdir(path)) == before and time.time() < deadline:
                pass
        else:
            time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        table = DeltaTable(str(path))
        referenced = {Path(u.removeprefix("file://")).name for v in range(table.version() + 1)
                      for u in DeltaTable(str(path), version=v).file_uris()}
        mid_write += bool({f.name for f in path.iterdir() if f.name != "_delta_log"} - referenced)
        if table.version() == 0:
            assert table.to_pandas().writer.tolist() == ["first"]
            assert [h["version"] for h in history(path)] == [0]
            # A rerun completes the write.
            write_version(path, pa.table({"subject_id": ["b"], "x": [2.0], "writer": ["rerun"]}), {**PROVENANCE, "input_digest": "1"})
            assert DeltaTable(str(path)).to_pandas().writer.tolist() == ["rerun"]
        else:
            assert table.version() == 1 and table.count() == 2_000_000
    assert mid_write, "no kill landed while the data file was being written"


PLAIN = textwrap.dedent("""
    import json, sys, duckdb
    con = duckdb.connect("stores/catalog.duckdb", read_only=True)
    print(json.dumps({q: con.execute(q).fetchall() for q in sys.argv[1:]}, default=str))
""")


def _plain(repo: Path, *queries: str) -> dict:
    """Query the catalog from a fresh process in the repository root with plain duckdb, no endopheno."""
    proc = subprocess.run([sys.executable, "-I", "-c", PLAIN, *queries], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_plain_duckdb_reads_every_schema_from_the_repository_root(repo, phantom_dir):
    samples = pd.read_parquet(repo / "stores" / "genotypes" / "phantom" / "samples.parquet")
    variants = pd.read_parquet(repo / "stores" / "genotypes" / "phantom" / "variants.parquet")
    ids = variants.id.iloc[[0, 5]].tolist()
    out = _plain(repo, "SELECT count(*) FROM features.atlas_regions",
                 "SELECT DISTINCT model_version FROM features.atlas_regions_v0",
                 "SELECT count(*) FROM cohort.analysis",
                 "SELECT count(*) FROM cohort.participants",
                 f"SELECT id, iid, dosage FROM genotypes.dosages({ids}) ORDER BY id, iid",
                 "SELECT count(*) FROM genotypes.pcs",
                 "SELECT feature_set, version, model_version FROM meta.feature_versions ORDER BY version")
    assert out["SELECT count(*) FROM features.atlas_regions"] == [[6]]
    assert out["SELECT DISTINCT model_version FROM features.atlas_regions_v0"] == [["1"]]
    assert out["SELECT count(*) FROM cohort.participants"] == [[len(pd.read_csv(phantom_dir / "bids" / "participants.tsv", sep="\t"))]]
    assert out["SELECT feature_set, version, model_version FROM meta.feature_versions ORDER BY version"] == [
        ["atlas_regions", 0, "1"], ["atlas_regions", 1, "2"]]
    from endopheno.genotypes.store import StoreSource
    calls = StoreSource(repo / "stores" / "genotypes" / "phantom").read(0, 6)
    got = out[f"SELECT id, iid, dosage FROM genotypes.dosages({ids}) ORDER BY id, iid"]
    expected = sorted((variants.id[k], iid, None if calls[k, j] == -127 else int(calls[k, j]))
                      for k in (0, 5) for j, iid in enumerate(samples.iid))
    assert [tuple(r) for r in got] == expected
    assert out["SELECT count(*) FROM genotypes.pcs"] == [[len(samples)]]


def test_cohort_join_counts_and_dropout_report(repo, phantom_dir):
    qc = pd.read_csv(repo / "stores" / "qc" / "qc.tsv", sep="\t")
    samples = set(pd.read_parquet(repo / "stores" / "genotypes" / "phantom" / "samples.parquet").iid)
    imaged = set(qc.subject)
    expected = {s for s in imaged if s in samples and bool(qc.set_index("subject").qc_pass[s])}
    not_genotyped = {s for s in imaged if s not in samples and bool(qc.set_index("subject").qc_pass[s])}
    assert not_genotyped, "the small phantom has an imaged subject without genotypes"
    out = tmp = repo / "cohort_out"
    run = cli("cohort", "--feature-set", "atlas_regions", "--out", str(out), cwd=repo, check=0)
    assert f"{len(expected)} in the analysis cohort" in run.stderr
    for s in not_genotyped:
        assert f"dropped at genotypes: {s}: not genotyped" in run.stderr
    pheno = pd.read_csv(tmp / "pheno.tsv", sep="\t")
    covar = pd.read_csv(tmp / "covar.tsv", sep="\t")
    assert set(pheno.IID) == expected and list(covar.columns[:4]) == ["FID", "IID", "age", "sex"]
    assert "whole_brain_volume_mm3" in pheno.columns and "pc1" in covar.columns
    assert json.loads((tmp / "pheno.tsv.lineage.json").read_text())["version"] == 1
    sql = _plain(repo, "SELECT dropped_at, count(*) FROM cohort.dropout GROUP BY ALL ORDER BY 1")
    assert dict(map(tuple, sql["SELECT dropped_at, count(*) FROM cohort.dropout GROUP BY ALL ORDER BY 1"]))["genotypes"] == len(not_genotyped)


def test_sql_formats_refusals_errors_and_as_of(repo, tmp_path):
    r = cli("sql", "SELECT subject_id, whole_brain_volume_mm3 FROM features.atlas_regions ORDER BY 1", cwd=repo, check=0)
    assert "ph0001" in r.stdout and "whole_brain_volume_mm3" in r.stdout
    csv = cli("sql", "SELECT subject_id FROM features.atlas_regions ORDER BY 1", "--format", "csv", cwd=repo, check=0).stdout
    assert csv.splitlines()[:2] == ['"subject_id"', '"ph0001"']
    js = cli("sql", "SELECT count(*) AS n FROM cohort.analysis", "--format", "json", cwd=repo, check=0).stdout
    assert json.loads(js)[0]["n"] > 0
    cli("sql", "SELECT * FROM genotypes.variants LIMIT 7", "--format", "parquet", "--out", str(tmp_path / "v.parquet"), cwd=repo, check=0)
    assert len(pd.read_parquet(tmp_path / "v.parquet")) == 7
    wide = cli("sql", "PIVOT (FROM genotypes.dosages((SELECT list(id) FROM (FROM genotypes.variants LIMIT 2)))) "
               "ON id USING first(dosage) GROUP BY iid", "--format", "csv", cwd=repo, check=0).stdout.splitlines()
    assert wide[0].count(",") == 2 and len(wide) > 2   # iid + a column per variant, a row per sample
    # Run from elsewhere: the catalog finds its repository root.
    cli("sql", "SELECT count(*) FROM features.atlas_regions", "--catalog", str(repo / "stores" / "catalog.duckdb"),
        "--params", str(repo / "params.yaml"), cwd=tmp_path, check=0)

    for statement in ("INSERT INTO meta.feature_sets VALUES (1)", "DELETE FROM meta.feature_versions",
                      "UPDATE meta.feature_versions SET version = 0", "CREATE TABLE t AS SELECT 1",
                      "DROP VIEW features.atlas_regions", f"ATTACH '{tmp_path}/x.duckdb'",
                      f"COPY (SELECT 1) TO '{tmp_path}/x.csv'", "SELECT 1; DROP VIEW features.atlas_regions",
                      "PIVOT meta.feature_sets ON name; DROP VIEW features.atlas_regions"):
        refused = cli("sql", statement, cwd=repo, check=2)
        assert "refused" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, statement
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "x.duckdb").exists()
    bad = cli("sql", "SELECT no_such_column FROM features.atlas_regions", cwd=repo, check=2)
    assert len(bad.stderr.strip().splitlines()) == 1 and "Binder Error" in bad.stderr and "Traceback" not in bad.stderr
    assert "Parser Error" in cli("sql", "SELEC 1", cwd=repo, check=2).stderr

    old = cli("sql", "SELECT DISTINCT model_version FROM atlas_regions", "--as-of", "0", "--format", "csv", cwd=repo, check=0)
    assert old.stdout.splitlines()[1] == '"1"'
    first = history(repo / "stores" / "features" / "atlas_regions")[0]["timestamp"]
    at = (first + dt.timedelta(milliseconds=1)).isoformat()
    assert cli("sql", "SELECT DISTINCT model_version FROM atlas_regions", "--as-of", at, "--format", "csv",
               cwd=repo, check=0).stdout.splitlines()[1] == '"1"'


def test_lineage_from_feature_version_and_gwas_run(repo):
    versions = history(repo / "stores" / "features" / "atlas_regions")
    out = cli("lineage", "atlas_regions@0", cwd=repo, check=0).stdout
    assert f"mlflow_run_id: {versions[0]['mlflow_run_id']}" in out and "model_version: 1" in out
    assert f"volume_store_digest: {versions[0]['volume_store_digest']}" in out and "git_revision:" in out
    assert "no such version" in cli("lineage", "atlas_regions@7", cwd=repo, check=2).stderr

    cli("cohort", "--feature-set", "atlas_regions", "--out", "gw_in", cwd=repo, check=0)
    cli("gwas", "--genotypes", "stores/genotypes/phantom", "--pheno", "gw_in/pheno.tsv", "--pheno-name",
        "whole_brain_volume_mm3", "--out", "stores/gwas/run1", "--tracking-uri", "sqlite:///stores/mlflow.db", cwd=repo, check=0)
    chain = cli("lineage", "--gwas", "stores/gwas/run1", cwd=repo, check=0).stdout
    assert "feature_set: atlas_regions" in chain and f"mlflow_run_id: {versions[1]['mlflow_run_id']}" in chain
    assert cli("lineage", "--gwas", str(repo / "stores" / "gwas" / "run1"), cwd=repo, check=0).stdout == chain   # absolute
    quoted = cli("lineage", "--gwas", "stores/gwas/it's", cwd=repo, check=2).stderr
    assert "neither an MLflow run id nor the output folder" in quoted and "Traceback" not in quoted
    cli("catalog", cwd=repo, check=0)
    got = _plain(repo, "SELECT feature_set_version, model_version, feature_mlflow_run_id FROM meta.lineage WHERE gwas_run_id IS NOT NULL",
                 "SELECT count(*) > 0 FROM gwas.results WHERE run = 'run1'")
    assert got["SELECT feature_set_version, model_version, feature_mlflow_run_id FROM meta.lineage WHERE gwas_run_id IS NOT NULL"] == [
        [1, "2", versions[1]["mlflow_run_id"]]]
    assert got["SELECT count(*) > 0 FROM gwas.results WHERE run = 'run1'"] == [[True]]


def test_gwas_reads_a_feature_set_version_through_the_cohort_join(repo, tmp_path):
    # v0 and v1 hold the same measurements (only model_version differs, which pheno.tsv leaves out): in a
    # copy of the repository, a v2 with other values shows which version the export read.
    shutil.copytree(repo, tmp_path / "repo", ignore=shutil.ignore_patterns("gwas"))
    repo = tmp_path / "repo"
    path = repo / "stores" / "features" / "atlas_regions"
    v0 = open_table(path, version=0).to_pandas().set_index("subject_id")
    doubled = open_table(path).to_pyarrow_table()
    doubled = doubled.set_column(doubled.schema.get_field_index("whole_brain_volume_mm3"), "whole_brain_volume_mm3",
                                 pa.compute.multiply(doubled["whole_brain_volume_mm3"], 2.0))
    write_version(path, doubled, {**PROVENANCE, "model_version": "3", "schema_version": 2, "input_digest": "doubled"})
    out = repo / "stores" / "gwas" / "atlas_v0"
    proc = cli("gwas", "--feature-set", "atlas_regions@0", "--out", str(out), "--no-mlflow", "--workers", "1", cwd=repo)
    assert "feature set atlas_regions v0" in proc.stderr
    lineage = json.loads((out / "cohort" / "pheno.tsv.lineage.json").read_text())
    assert lineage["version"] == 0
    pheno = pd.read_csv(out / "cohort" / "pheno.tsv", sep="\t")
    covar = pd.read_csv(out / "cohort" / "covar.tsv", sep="\t")
    assert np.allclose(pheno.whole_brain_volume_mm3, v0.loc[pheno.IID.astype(str), "whole_brain_volume_mm3"])
    joined = cli("sql", "SELECT count(*) AS n FROM cohort.analysis", "--format", "csv", cwd=repo, check=0)
    assert len(pheno) == len(covar) == int(joined.stdout.split()[-1])
    assert {"age", "sex", "pc1", "pc2", "pc3"} <= set(covar.columns)
    assert "whole_brain_volume_mm3" in pheno.columns and "model_version" not in pheno.columns
    # 5 samples cannot carry the model's coefficients: no p-value is invented, the run refuses in one line
    assert proc.returncode == 2 and "no phenotype can be tested" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "results").exists()
    bad = cli("gwas", "--feature-set", "atlas_regions@7", "--out", str(out), "--no-mlflow", cwd=repo, check=2)
    assert "atlas_regions@7: no such version" in bad.stderr


def test_the_duckdb_command_line_client_answers_the_cohort_join(repo):
    exe = Path(sys.executable).with_name("duckdb")  # the duckdb-cli package's client, not the Python module
    queries = ["SELECT count(*) AS n FROM cohort.analysis", "SELECT max(version) AS n FROM meta.feature_versions",
               "SELECT count(*) AS n FROM cohort.dropout", "SELECT count(*) AS n FROM features.atlas_regions_v0"]
    for query in queries:
        proc = subprocess.run([str(exe), "-readonly", "-json", "stores/catalog.duckdb", "-c", query], cwd=repo,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == [{"n": _plain(repo, query)[query][0][0]}]


def _toy_repo(root: Path, *, features: dict | None = None, participants: str | None = None, qc: str | None = None):
    """A repository root for the cohort join, written in a second: the feature set `toy` (one version),
    participants.tsv, qc.tsv and a genotype store's sample tables. Returns the catalog's params."""
    from endopheno.featurestore.catalog import CatalogParams

    (root / "features").mkdir(parents=True)
    rows = features or {"subject_id": ["01", "02", "03"], "session": [None, None, None]}
    table = pa.table({**rows, "x": [float(i) for i in range(len(rows["subject_id"]))]})
    write_version(root / "stores" / "features" / "toy", table, {**PROVENANCE, "input_digest": "1"})
    (root / "participants.tsv").write_text(participants or "participant_id\tage\nsub-01\t70\nsub-02\t71\nsub-03\t72\n")
    (root / "qc.tsv").write_text(qc or "subject\tqc_correlation\tqc_pass\tnote\tetiv_mm3\n"
                                       + "".join(f"{s}\t0.9\tTrue\t\t1.5e6\n" for s in ("01", "02", "03")))
    geno = root / "geno"
    geno.mkdir()
    iids = ["01", "02", "03"]
    pd.DataFrame({"fid": iids, "iid": iids, "pc1": [0.1, 0.2, 0.3]}).to_parquet(geno / "samples.parquet")
    pd.DataFrame({"id": ["v1"]}).to_parquet(geno / "variants.parquet")
    pd.DataFrame({"iid": pd.Series([], dtype=str), "reason": pd.Series([], dtype=str)}).to_parquet(geno / "removed_samples.parquet")
    return CatalogParams(features="stores/features", definitions="features", participants="participants.tsv",
                         imaging_qc="qc.tsv", genotypes="geno", gwas=None, attribution=None, covariates=["age"],
                         analysis_feature_set="toy")


def _joined(p, root: Path) -> list[tuple]:
    from endopheno.featurestore.catalog import cohort_catalog

    return cohort_catalog(p, root).execute("SELECT subject_id, session, dropped_at, reason FROM cohort.joined_toy "
                                           "ORDER BY subject_id, session NULLS FIRST").fetchall()


def test_the_catalog_reads_a_repository_whose_path_needs_escaping(tmp_path):
    """deltalake percent-encodes its file URIs: a space, an accent or a '+' in the path must still work;
    a '#' (whose history deltalake cannot read) is one clear error, not a commit lost."""
    from endopheno.featurestore.store import snapshot_files

    root = tmp_path / "sp ace é+"
    p = _toy_repo(root)
    assert all(Path(f).exists() for f in snapshot_files(root / "stores" / "features" / "toy"))
    assert [r[2] for r in _joined(p, root)] == [None, None, None]
    with pytest.raises(InputError, match="'#'"):
        write_version(tmp_path / "a#b" / "set", pa.table({"subject_id": ["a"]}), {**PROVENANCE, "input_digest": "1"})


def test_configuration_mistakes_in_the_cohort_tables_are_one_error_naming_them(tmp_path):
    from dataclasses import replace

    p = _toy_repo(tmp_path)
    with pytest.raises(InputError, match="nope.tsv: imaging QC table not found"):
        _joined(replace(p, imaging_qc="nope.tsv"), tmp_path)
    assert {r[2] for r in _joined(replace(p, imaging_qc=None), tmp_path)} == {"imaging_qc"}   # null: no QC, said so
    with pytest.raises(InputError, match="participants.tsv: no column education"):
        _joined(replace(p, covariates=["age", "education"]), tmp_path)
    (tmp_path / "participants.tsv").write_text("id\tage\nsub-01\t70\n")
    with pytest.raises(InputError, match="participants.tsv: no column participant_id"):
        _joined(p, tmp_path)


def test_a_duplicated_participant_id_is_one_subject_dropped_with_the_reason(tmp_path):
    p = _toy_repo(tmp_path, participants="participant_id\tage\nsub-01\t70\nsub-02\t71\nsub-02\t75\nsub-03\t72\n")
    assert _joined(p, tmp_path) == [("01", None, None, None),
                                    ("02", None, "participants", "duplicated in the participants table (2 rows)"),
                                    ("03", None, None, None)]
    from endopheno.featurestore.catalog import cohort_catalog

    con = cohort_catalog(p, tmp_path)
    assert con.execute("SELECT count(*), count(DISTINCT subject_id) FROM cohort.participants").fetchone() == (3, 3)


def test_sessions_keep_their_subject_and_the_cohort_one_session_each(tmp_path):
    """Multi-session rows carry subject_id and session (the MNI label split); QC is per session, and of a
    subject's sessions that pass, the first by label is analysed, the others drop out saying why."""
    from endopheno.featurestore.atlas import Atlas, to_table
    from endopheno.featurestore.definitions import key_columns

    labels = ["01_ses-1", "01_ses-2", "02_ses-1", "02_ses-2", "03"]
    keys = key_columns(labels)
    assert keys == {"subject_id": ["01", "01", "02", "02", "03"], "session": ["1", "2", "1", "2", None]}
    atlas = Atlas(np.zeros((2, 2, 2), np.int16), ("a",), "test")
    schema = pa.schema([("subject_id", pa.string()), ("session", pa.string()), *[(f"{r}_{k}", pa.float64()) for r in atlas.regions
                        for k in ("volume_mm3", "mean_t1", "tbm_volume_mm3")], ("model_name", pa.string()), ("model_version", pa.string())])
    rows = {s: {"volume": np.ones(2), "mean": np.ones(2), "tbm": np.ones(2)} for s in labels}
    table = to_table(rows, atlas, schema, "atlas", "1")
    assert table.select(["subject_id", "session"]).to_pydict() == keys

    qc = "subject\tqc_correlation\tqc_pass\tnote\tetiv_mm3\n" + "".join(
        f"{s}\t0.9\t{s != '02_ses-1'}\t\t1.5e6\n" for s in labels)            # 02's first session fails QC
    p = _toy_repo(tmp_path, features=keys, qc=qc)
    once = "one session per individual: ses-{} is analysed (the first by session label)"
    assert _joined(p, tmp_path) == [("01", "1", None, None), ("01", "2", "sessions", once.format(1)),
                                    ("02", "1", "imaging_qc", "flagged by imaging QC: low correlation with the template"),
                                    ("02", "2", None, None), ("03", None, None, None)]


def test_explain_analyze_cannot_write_through_the_read_only_guard(tmp_path):
    import duckdb

    from endopheno.errors import EndophenoError
    from endopheno.featurestore.catalog import check_read_only, query

    target = tmp_path / "x.csv"
    for sql in (f"EXPLAIN ANALYZE COPY (SELECT 42) TO '{target}'", f"explain analyse copy (select 42) to '{target}'",
                f"/* why */ EXPLAIN (ANALYZE) COPY (SELECT 42) TO '{target}'", "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1"):
        with pytest.raises(EndophenoError, match="refused a (COPY|CREATE)"):
            query(duckdb.connect(), sql)
    assert not target.exists()
    for sql in ("EXPLAIN SELECT 1", "EXPLAIN ANALYZE SELECT 1", "EXPLAIN (FORMAT json) SELECT 1"):
        check_read_only(sql)


def test_a_version_with_failed_subjects_is_never_unchanged(tmp_path):
    """Failed subjects are in the commit; a rerun with the same inputs measures again, writes a version
    when the result differs (fewer failures), and none when the same subjects fail again."""
    from endopheno.featurestore.store import unchanged_version

    path = tmp_path / "set"
    t = pa.table({"subject_id": ["a"], "x": [1.0]})
    meta = {**PROVENANCE, "input_digest": "1", "participants_sha256": "abc"}
    assert write_version(path, t, {**meta, "failed_subjects": ["b"]}).created
    assert history(path)[0]["failed_subjects"] == '["b"]' and history(path)[0]["participants_sha256"] == "abc"
    assert unchanged_version(path, "1") is None
    assert not write_version(path, t, {**meta, "failed_subjects": ["b"]}).created     # the same failure again
    both = pa.table({"subject_id": ["a", "b"], "x": [1.0, 2.0]})
    assert write_version(path, both, meta).version == 1
    assert unchanged_version(path, "1") == (1, 2)
