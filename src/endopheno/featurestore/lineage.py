"""Lineage: from a feature-set version, or from a GWAS run, back to the model version, the MLflow run
that produced the features, the volume-store digest and the git revision. The same chain is in SQL as
`meta.lineage` in the catalog."""

from __future__ import annotations

import json
from pathlib import Path

from endopheno.errors import InputError
from endopheno.featurestore.store import history


def feature_lineage(store: str | Path, name: str, version: int | None = None) -> dict:
    """The provenance recorded in the commit of version `version` (default: latest) of feature set `name`."""
    versions = history(Path(store) / name)
    chosen = versions[-1] if version is None else next((v for v in versions if v["version"] == version), None)
    if chosen is None:
        raise InputError(f"{name} v{version}", f"no such version (versions 0..{versions[-1]['version']})")
    return {"feature_set": name, **chosen, "timestamp": chosen["timestamp"].isoformat()}


def gwas_lineage(run: str, store: str | Path, tracking_uri: str | None = None) -> dict:
    """A GWAS run (MLflow run id, or its output folder) back to the feature-set version its phenotype
    file was exported from (the file's `.lineage.json` and the run's recorded sha256 must agree)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from endopheno.tracking import tracking_uri as uri

    client = mlflow.tracking.MlflowClient(uri(tracking_uri))
    experiment = client.get_experiment_by_name("endopheno.gwas")
    if experiment is None:
        raise InputError(run, "no GWAS runs are recorded in MLflow")
    try:
        found = client.get_run(run)
    except MlflowException:
        # Matched here, not in a filter string: a folder name may hold a quote, and the run may name the
        # folder relative to the repository where the user gives it absolute (or the other way round).
        wanted = Path(run).resolve()
        matches = [r for r in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
                   if r.data.tags.get("out") and Path(r.data.tags["out"]).resolve() == wanted]
        if not matches:
            raise InputError(run, "neither an MLflow run id nor the output folder of a recorded GWAS run") from None
        found = matches[0]
    params, tags = found.data.params, found.data.tags
    chain = {"gwas_run_id": found.info.run_id, "gwas_out": tags.get("out"), "gwas_git_revision": tags.get("git_revision"),
             "genotypes_digest": tags.get("genotypes_digest"), "pheno": params.get("pheno")}
    sidecar = Path(f"{params.get('pheno', '')}.lineage.json")
    if not sidecar.exists():
        return {**chain, "feature_set": None, "note": "the phenotype file was not exported by `endopheno cohort`"}
    link = json.loads(sidecar.read_text())
    if link.get("pheno_sha256") != params.get("pheno_sha256"):
        return {**chain, "feature_set": None, "note": f"{params['pheno']} changed after the run (sha256 differs)"}
    return {**chain, **{f"features_{k}" if k in ("git_revision",) else k: v
                        for k, v in feature_lineage(store, link["feature_set"], link["version"]).items()}}
