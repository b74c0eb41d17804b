"""Where each result of the report came from, read from what the stages leave behind: the training
metrics (model version, MLflow run), the cohort export's ``pheno.tsv.lineage.json`` beside each GWAS
(feature-set version), the feature store's commit metadata (the model version and extraction run behind
that version) and MLflow (run ids, their git revisions, links)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from endopheno.errors import EndophenoError
from endopheno.report.html import Section, table

MLFLOW_UI = "http://127.0.0.1:5000"     # where `mlflow ui` serves a sqlite store by default
GWAS_EXPERIMENT = "endopheno.gwas"
ATTRIBUTION_EXPERIMENT = "endopheno.attribution"


class Tracking:
    """The MLflow record, read only. A sqlite store that does not exist is left uncreated: the lineage then
    shows the run ids the files name, without links."""

    def __init__(self, uri: str | None):
        from endopheno.tracking import tracking_uri

        self.uri = tracking_uri(uri)
        self.client = None
        if self.uri.startswith("sqlite:///") and not Path(self.uri.removeprefix("sqlite:///")).exists():
            return
        import mlflow

        for noisy in ("mlflow", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self.client = mlflow.MlflowClient(self.uri)

    def run(self, run_id: str | None):
        from mlflow.exceptions import MlflowException

        if self.client is None or not run_id:
            return None
        try:
            return self.client.get_run(run_id)
        except MlflowException:
            return None

    def gwas_run(self, folder: Path):
        """The latest GWAS run whose output folder was `folder` (the tag ``out`` of `endopheno gwas`)."""
        experiment = self.client.get_experiment_by_name(GWAS_EXPERIMENT) if self.client else None
        if experiment is None:
            return None
        for out in dict.fromkeys((str(folder), str(folder.resolve()))):
            runs = self.client.search_runs([experiment.experiment_id], f"tags.out = '{out}'",
                                           order_by=["attributes.start_time DESC"], max_results=1)
            if runs:
                return runs[0]
        return None

    def attribution_run(self, model: str):
        """The latest finished attribution run of registered model `model`, whichever version it explained
        (its tag ``model_version``): what `endopheno attribute` last wrote to the model's attribution
        folder. That is the version of attribute.alias (champion), which need not be the version the latest
        training registered."""
        experiment = self.client.get_experiment_by_name(ATTRIBUTION_EXPERIMENT) if self.client else None
        if experiment is None:
            return None
        runs = self.client.search_runs([experiment.experiment_id],
                                       f"tags.model_name = '{model}' AND attributes.status = 'FINISHED'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None

    def link(self, run) -> str:
        server = self.uri if self.uri.startswith("http") else MLFLOW_UI
        return f"{server}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"


def feature_set_origin(gwas_folder: Path, features: str | Path, name: str) -> dict:
    """The feature-set version a GWAS read (its cohort export's lineage.json) and that version's commit
    metadata in the feature store (model name and version, extraction run, git revision); a ``note``
    says what could not be traced."""
    from endopheno.featurestore.lineage import feature_lineage

    sidecar = gwas_folder / "cohort" / "pheno.tsv.lineage.json"
    if not sidecar.exists():
        return {"feature_set": name, "note": f"{sidecar} is missing: the GWAS did not read an exported feature set"}
    link = json.loads(sidecar.read_text())
    try:
        return {**feature_lineage(features, link["feature_set"], link["version"]), "pheno_sha256": link.get("pheno_sha256")}
    except EndophenoError as e:
        return {"feature_set": link["feature_set"], "version": link["version"], "note": str(e)}


def lineage_section(models: dict[str, dict], origins: dict[str, dict], gwas: dict[str, Path], tracking: Tracking,
                    revision: str) -> Section:
    """One row per result: each model's training (and attribution) run, each feature-set version and the
    GWAS on it, and this report's git revision; `models` maps a model to its metrics.json, `origins` and
    `gwas` a feature set to its origin and GWAS folder."""
    s = Section("lineage", "Lineage")
    rows = []

    def row(result: str, version: str, run_id: str | None, revision: str | None = None, note: str = "") -> None:
        run = tracking.run(run_id)
        rows.append({"result": result, "version": version, "MLflow run": run_id or "–",
                     "git revision": revision or (run.data.tags.get("git_revision") if run else None) or "–",
                     "link": tracking.link(run) if run else "–", "note": note})

    for name, m in models.items():
        model, version = m.get("model", name), str(m.get("version"))
        row(f"model {model}", f"v{version}" + (" (champion)" if m.get("champion") else ""), m.get("mlflow_run_id"))
        attribution = tracking.attribution_run(model)
        if attribution is not None:
            explained = attribution.data.tags.get("model_version", "?")
            row(f"attribution of {model}", f"v{explained}", attribution.info.run_id,
                note="" if explained == version else f"explains v{explained}; the latest training registered v{version}")
    for name, folder in gwas.items():
        origin = origins[name]
        made_by = f" from {origin['model_name']} v{origin['model_version']}" if origin.get("model_name") else ""
        feature_version = f"v{origin['version']}" if "version" in origin else "–"
        row(f"feature set {name}", feature_version + made_by, origin.get("mlflow_run_id"), origin.get("git_revision"),
            origin.get("note", ""))
        run = tracking.gwas_run(folder)
        note = "" if run or tracking.client is None else "no MLflow run recorded for this folder"
        if run is not None and origin.get("pheno_sha256") not in (None, run.data.params.get("pheno_sha256")):
            note = "its phenotype file was exported again after the run (sha256 differs): the version may not be the one read"
        row(f"GWAS {name}", f"on {name} {feature_version}", run.info.run_id if run else None, note=note)
    row("this report", "–", None, revision)
    s.add(table(pd.DataFrame(rows)))
    if tracking.client is None:
        s.lack(f"The MLflow tracking store {tracking.uri}", "`endopheno train` (the first stage that records a run)")
    elif any(r["link"] != "–" for r in rows):
        s.explain(f"The links open in MLflow's UI: `mlflow ui --backend-store-uri {tracking.uri}`.")
    return s
