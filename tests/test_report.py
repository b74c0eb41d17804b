"""`endopheno report` on small real inputs: a participants table, QC table and montage, training metrics, an
attribution folder with a latent-to-region map, a feature-set version in a real Delta store, a real GWAS on it
recorded in a real MLflow store, and a validation table. The page's numbers are checked against the inputs, a
missing stage becomes a note, and the page is opened in a headless chromium to check that every figure loads."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import cli

HEADINGS = ["1. Cohort", "2. Imaging QC", "3. Models", "4. Attribution", "5. Association studies",
            "6. Validation against the phantom's truth", "7. Lineage"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.slow      # the fixture runs a real GWAS recorded in MLflow and the report command: ~15 s


def _png(path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(3, 2), dpi=50)
    ax.imshow(np.random.default_rng(0).random((8, 8)))
    ax.set_title(title)
    fig.savefig(path)
    plt.close(fig)


def _participants(path: Path) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    n = 37
    table = pd.DataFrame({"participant_id": [f"sub-s{i:03d}" for i in range(n)], "age": rng.normal(72, 7, n).round(1),
                          "sex": rng.choice(["F", "M"], n), "diagnosis": rng.choice(["AD", "CN"], n),
                          "site": rng.choice(["site1", "site2", "site3"], n)})
    table.to_csv(path, sep="\t", index=False)
    return table


def _latent_map(folder: Path) -> pd.DataFrame:
    """A latent-to-region table of 3 dimensions made as `endopheno attribute` makes it (region_shares,
    top_regions), dimension d changing region d most."""
    from endopheno.attribution.regions import region_shares, top_regions
    from endopheno.featurestore.atlas import Atlas

    labels = np.zeros((6, 6, 6), np.int16)
    labels[:3, :3], labels[3:, :3], labels[:3, 3:] = 1, 2, 3
    change = np.full((3, 6, 6, 6), 0.01)
    for d in range(3):
        change[d][labels == d + 1] = 1.0
    table = region_shares(change, Atlas(labels, ("hippocampus_L", "amygdala_L", "ventricle_L"), "test"), np.ones((6, 6, 6)))
    table.insert(0, "model_version", "0")
    table.insert(0, "model_name", "endopheno.autoencoder3d")
    folder.mkdir(parents=True)
    table.to_parquet(folder / "latent_regions.parquet", index=False)
    top = top_regions(table)
    top.to_csv(folder / "top_regions.tsv", sep="\t", index=False)
    pd.DataFrame({"method": ["integrated_gradients"], "status": ["skipped"], "reason": ["its output is a volume"],
                  "subjects": [0]}).to_csv(folder / "checks.tsv", sep="\t", index=False)
    return top


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Every input the report reads, and the report made by `endopheno report` from a params file."""
    import pyarrow as pa

    from endopheno.featurestore.store import write_version
    from endopheno.genotypes.store import file_sha256
    from endopheno.gwas.simulate import write_study

    root = tmp_path_factory.mktemp("report")
    participants = _participants(root / "participants.tsv")
    (root / "qc").mkdir()
    qc = pd.DataFrame({"subject": participants.participant_id.str.removeprefix("sub-"), "qc_correlation": 0.9,
                       "qc_pass": True, "note": ""})
    qc.loc[[3, 11], ["qc_correlation", "qc_pass"]] = [0.61, False]
    qc.to_csv(root / "qc" / "qc.tsv", sep="\t", index=False)
    _png(root / "qc" / "montage.png", "montage")
    metrics = {"model": "endopheno.cnn3d", "version": "3", "champion": True, "mlflow_run_id": "0123abcd",
               "balanced_accuracy_mean": 0.8125, "balanced_accuracy_sd": 0.04, "auc_mean": 0.9, "auc_sd": 0.03,
               "baseline_balanced_accuracy_mean": 0.7625, "baseline_balanced_accuracy_sd": 0.05,
               "baseline_auc_mean": 0.85, "baseline_auc_sd": 0.02}
    (root / "models" / "cnn3d").mkdir(parents=True)
    (root / "models" / "cnn3d" / "metrics.json").write_text(json.dumps(metrics))
    cnn = root / "attribution" / "cnn3d"
    cnn.mkdir(parents=True)
    pd.DataFrame({"method": ["integrated_gradients", "svm_haufe"], "group": "AD", "truth_voxels": 51,
                  "dice_top5": [0.41, 0.46], "auc": [0.777, 0.826]}).to_csv(cnn / "scores.tsv", sep="\t", index=False)
    pd.DataFrame({"method": ["integrated_gradients", "lrp"], "status": ["ok", "skipped"],
                  "reason": ["", "no LRP rule for this layer"], "subjects": [16, 0], "seconds": [1.0, np.nan],
                  "completeness_median": [0.004, np.nan], "completeness_max": [0.009, np.nan],
                  "randomisation_rank_correlation": [0.21, np.nan]}).to_csv(cnn / "checks.tsv", sep="\t", index=False)
    for kind in ("ortho", "glass"):
        _png(cnn / f"integrated_gradients_AD_{kind}.png", kind)
    top = _latent_map(root / "attribution" / "autoencoder3d")

    # ae_t1 version 0 in a real feature store, its cohort exported beside the GWAS as `endopheno cohort` does
    study = write_study(root / "study", samples=300, variants=200, phenotypes=3, causal={7: 1.5}, seed=3)
    pheno = pd.read_csv(root / "study" / "pheno.tsv", sep="\t").rename(columns={"y0": "f000", "y1": "f001", "y2": "f002"})
    features = pa.table({"subject_id": pheno["IID"], **{c: pheno[c].to_numpy(np.float32) for c in ("f000", "f001", "f002")}})
    write_version(root / "features" / "ae_t1", features, {"model_name": "endopheno.autoencoder3d", "model_version": "0",
                                                         "mlflow_run_id": "feedbeef", "input_digest": "1"})
    cohort = root / "gwas" / "ae_t1" / "cohort"
    cohort.mkdir(parents=True)
    pheno.to_csv(cohort / "pheno.tsv", sep="\t", index=False, na_rep="NA")
    (cohort / "pheno.tsv.lineage.json").write_text(json.dumps({"feature_set": "ae_t1", "version": 0,
                                                               "pheno_sha256": file_sha256(cohort / "pheno.tsv")}))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    proc = cli("gwas", "--bfile", str(study), "--pheno", str(cohort / "pheno.tsv"), "--covar",
               str(root / "study" / "covar.tsv"), "--out", str(root / "gwas" / "ae_t1"), "--tracking-uri", uri,
               "--workers", "1", check=0)

    (root / "validation").mkdir()
    (root / "validation" / "validation.json").write_text(json.dumps({"feature_sets": {"ae_t1": {
        "planted": 1, "found": 1, "false_loci": 0, "lambda_gc_median": 1.01, "phenotypes": 3,
        "study_wide_threshold": 1.7e-8}}, "targets": {"ae_t1 finds half": True}}))
    pd.DataFrame({"feature_set": ["ae_t1"], "kind": ["planted"], "region": ["hippocampus_L"], "planted_variant": ["v7"],
                  "chrom": [1], "pos": [100], "found": [True], "phenotype": ["f000"], "lead_id": ["v7"],
                  "distance_kb": [0.0], "p": [1e-12]}).to_csv(root / "validation" / "loci.tsv", sep="\t", index=False)

    params = {"out": str(root / "report"), "participants": str(root / "participants.tsv"), "qc_dir": str(root / "qc"),
              "models_dir": str(root / "models"), "models": ["cnn3d", "autoencoder3d"],
              "attribution": str(root / "attribution"), "gwas": str(root / "gwas"),
              "feature_sets": ["ae_t1", "atlas_regions"], "validation": str(root / "validation"),
              "features": str(root / "features"), "tracking_uri": uri}
    (root / "params.yaml").write_text(yaml.safe_dump({"report": params}))
    cli("report", "--params", str(root / "params.yaml"), check=0)
    return {"root": root, "params": params, "participants": participants, "top": top,
            "gwas_run": proc.stderr.split("MLflow run ")[-1].split()[0], "causal": pd.read_csv(f"{study}.bim", sep="\t",
                                                                                                header=None)[1][7]}


class _Tables(HTMLParser):
    """The page's headings and tables (rows of cell texts), read with the standard library's parser."""

    def __init__(self, html: str):
        super().__init__()
        self.headings, self.tables, self.images, self._cell = [], [], [], None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th", "h2"):
            self._cell = ""
        elif tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell.strip())
        elif tag == "h2":
            self.headings.append(self._cell.strip())
        if tag in ("td", "th", "h2"):
            self._cell = None

    def table(self, first_header: str) -> pd.DataFrame:
        rows = next(t for t in self.tables if t and t[0] and t[0][0] == first_header)
        return pd.DataFrame(rows[1:], columns=rows[0])


def test_report_shows_the_cohort_models_gwas_and_lineage_of_real_inputs(project):
    out = project["root"] / "report"
    page = _Tables((out / "index.html").read_text())
    assert page.headings == HEADINGS

    cohort = page.table("diagnosis").set_index("diagnosis")
    p = project["participants"]
    for label, g in [*p.groupby("diagnosis"), ("all", p)]:
        row = cohort.loc[label]
        assert int(row["subjects"]) == len(g)
        assert (int(row["sex F"]), int(row["sex M"])) == ((g.sex == "F").sum(), (g.sex == "M").sum())
        assert row["age (mean ± SD)"] == f"{g.age.mean():.1f} ± {g.age.std():.1f}"
        assert [int(row[s]) for s in ("site1", "site2", "site3")] == [(g.site == s).sum() for s in ("site1", "site2", "site3")]
    text = (out / "index.html").read_text()
    assert "Imaging QC: 35 of 37 preprocessed subjects pass" in text
    assert "Genotyped samples with phenotypes in each association study: ae_t1: 300." in text

    metrics = page.table("metric").set_index("metric")
    assert metrics.loc["balanced_accuracy"].tolist() == ["0.812 ± 0.040", "0.762 ± 0.050"]
    assert page.table("method")["method"].tolist() == ["integrated_gradients", "svm_haufe"]
    assert "Skipped lrp: no LRP rule for this layer." in text

    loci = page.table("phenotype")
    hit = loci[loci["phenotype"] == "f000"].iloc[0]
    assert hit["lead variant"] == project["causal"]
    assert hit.iloc[1] == project["top"].set_index("dimension").loc["f000", "regions"]   # f000 ↦ hippocampus_L first
    assert hit.iloc[1].startswith("hippocampus_L")
    assert set(loci["phenotype"]) <= {"f000", "f002"}                                        # the causal effect's phenotypes
    assert page.table("feature set")["found"].tolist() == ["1"]

    lineage = page.table("result").set_index("result")
    gwas = lineage.loc["GWAS ae_t1"]
    assert gwas["MLflow run"] == project["gwas_run"] and "/#/experiments/" in gwas["link"]
    assert gwas["version"] == "on ae_t1 v0" and not gwas["note"]
    assert lineage.loc["feature set ae_t1", "version"] == "v0 from endopheno.autoencoder3d v0"
    assert lineage.loc["model endopheno.cnn3d", "version"] == "v3 (champion)"

    record = json.loads((out / "report.json").read_text())
    status = {k: v["status"] for k, v in record["sections"].items()}
    assert status == {"cohort": "present", "qc": "present", "models": "partial", "attribution": "present",
                      "association": "partial", "validation": "present", "lineage": "present"}
    assert any("atlas_regions" in m and "endopheno gwas" in m for m in record["sections"]["association"]["missing"])
    assert sorted(page.images) == sorted(record["figures"]) and len(page.images) == 5
    for src in page.images:
        assert (out / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_stage_is_a_note_and_a_rerun_replaces_the_whole_folder(project, tmp_path):
    from endopheno.report import build_report, load_report_params

    params = {**project["params"], "attribution": str(tmp_path / "no-attribution"), "out": str(tmp_path / "report"),
              "tracking_uri": f"sqlite:///{tmp_path / 'no-mlflow.db'}"}
    (tmp_path / "report" / "figures").mkdir(parents=True)
    (tmp_path / "report" / "figures" / "stale.png").write_bytes(b"old")
    summary = build_report(load_report_params(params))
    record = json.loads((tmp_path / "report" / "report.json").read_text())["sections"]
    assert summary.sections["attribution"] == record["attribution"]["status"] == "missing"
    assert all("`endopheno attribute --model" in m for m in record["attribution"]["missing"])
    assert any("latent-to-region map of endopheno.autoencoder3d v0" in m for m in record["association"]["missing"])
    assert record["lineage"]["status"] == "partial" and not (tmp_path / "no-mlflow.db").exists()
    text = (tmp_path / "report" / "index.html").read_text()
    assert text.count('class="missing"') == sum(len(s["missing"]) for s in record.values())
    assert _Tables(text).headings == HEADINGS
    assert not (tmp_path / "report" / "figures" / "stale.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]          # no staging folder left behind


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
def test_the_page_loads_every_figure_in_a_headless_browser(project):
    from playwright.sync_api import sync_playwright

    index = project["root"] / "report" / "index.html"
    figures = json.loads(index.with_name("report.json").read_text())["figures"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(index.as_uri(), wait_until="load")
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.getAttribute('src'), i.naturalWidth])")
            assert page.title() == "endopheno report"
            assert page.eval_on_selector_all("h2", "hs => hs.map(h => h.textContent)") == HEADINGS
        finally:
            browser.close()
    assert sorted(src for src, _ in widths) == sorted(figures)
    assert all(width > 0 for _, width in widths), widths


def test_the_lineage_names_the_version_the_attribution_explains(tmp_path):
    """`endopheno attribute` explains the version holding attribute.alias (champion), which need not be the
    one the latest training registered (metrics.json): the lineage still shows the attribution's run, and
    which version it explains."""
    from endopheno.attribution.run import EXPERIMENT
    from endopheno.report.lineage import Tracking, lineage_section
    from endopheno.tracking import mlflow_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with mlflow_run(EXPERIMENT, "attribute endopheno.cnn3d/1", uri=uri,
                    tags={"endopheno.kind": "attribution", "model_name": "endopheno.cnn3d", "model_version": "1"}) as run:
        pass
    metrics = {"cnn3d": {"model": "endopheno.cnn3d", "version": "2", "champion": False, "mlflow_run_id": "0123abcd"}}
    section = lineage_section(metrics, {}, {}, Tracking(uri), "abc")
    rows = _Tables("".join(section.parts)).table("result").set_index("result")
    attribution = rows.loc["attribution of endopheno.cnn3d"]
    assert attribution["version"] == "v1" and attribution["MLflow run"] == run.info.run_id
    assert "explains v1" in attribution["note"] and "registered v2" in attribution["note"]


def test_a_feature_set_validation_could_not_score_is_named(tmp_path):
    """validation.json lists the sets without a finished GWAS under `missing`: the report says so rather
    than leaving them out of the table unmentioned."""
    from endopheno.report import build_report, load_report_params

    (tmp_path / "validation").mkdir()
    (tmp_path / "validation" / "validation.json").write_text(json.dumps({
        "feature_sets": {"atlas_regions": {"planted": 6, "found": 6, "false_loci": 0, "lambda_gc_median": 0.99,
                                           "phenotypes": 30, "study_wide_threshold": 1.7e-9}},
        "missing": {"ae_t1": f"{tmp_path}/gwas/ae_t1: no finished GWAS here"}}))
    pd.DataFrame({"feature_set": ["atlas_regions"], "kind": ["planted"]}).to_csv(tmp_path / "validation" / "loci.tsv",
                                                                              sep="\t", index=False)
    params = {"out": str(tmp_path / "report"), "validation": str(tmp_path / "validation"),
              "participants": str(tmp_path / "none.tsv"), "qc_dir": str(tmp_path / "none"),
              "models_dir": str(tmp_path / "none"), "attribution": str(tmp_path / "none"), "gwas": str(tmp_path / "none"),
              "features": str(tmp_path / "none"), "tracking_uri": f"sqlite:///{tmp_path / 'none.db'}"}
    build_report(load_report_params(params))
    validation = json.loads((tmp_path / "report" / "report.json").read_text())["sections"]["validation"]
    assert validation["status"] == "partial"
    assert any("validation of ae_t1" in m and "no finished GWAS" in m for m in validation["missing"]), validation
