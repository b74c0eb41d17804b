"""Extraction: a registered model version turns every preprocessed subject into one row of a feature set.

``endopheno extract --model endopheno.autoencoder3d@champion --feature-set ae_t1`` resolves the alias to
a version, loads it from the registry, runs it over the volume store and commits the rows (latent
dimensions, penultimate features, class probability or prediction, as the set's definition says) as
a new version of ``stores/features/<set>``, with the model name and version on every row and in the
commit. Nothing is written when the latest version was extracted by the same model version from the
same volumes with no subject failed.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from endopheno.errors import InputError
from endopheno.featurestore.atlas import BuildReport
from endopheno.featurestore.definitions import FeatureSet
from endopheno.models.volume_model import OUTPUTS, VolumeModel, check_grid

log = logging.getLogger(__name__)
MODEL_URI = re.compile(r"^(?:models:/)?(?P<name>[\w.\-]+?)(?:@(?P<alias>\w+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ExtractParams:
    """The ``extract`` section of params.yaml."""

    definitions: str = "features"
    store: str = "stores/features"
    volumes: str = "stores/volumes.zarr"
    batch_size: int = 16
    loader_workers: int = 1
    device: str = "auto"
    tracking_uri: str | None = None
    participants: str | None = "data/phantom/bids/participants.tsv"   # the covariates of a model trained with them
    sets: dict | None = None            # the sets the pipeline extracts -> the model entry each reads


def resolve(uri: str) -> tuple[str, str]:
    """``name@alias``, ``name/version`` or ``models:/…`` → (registered name, version number)."""
    import mlflow

    m = MODEL_URI.match(uri)
    if not m:
        raise InputError(uri, "not a model reference (write NAME@ALIAS or NAME/VERSION, e.g. endopheno.cnn3d@champion)")
    client = mlflow.MlflowClient()
    try:
        if m["alias"]:
            return m["name"], str(client.get_model_version_by_alias(m["name"], m["alias"]).version)
        return m["name"], str(client.get_model_version(m["name"], m["version"]).version)
    except mlflow.exceptions.MlflowException:
        known = ", ".join(sorted(r.name for r in client.search_registered_models())) or "none"
        raise InputError(uri, f"not in the model registry (registered: {known}; train one with `endopheno train`)") from None


def load_model(name: str, version: str) -> VolumeModel:
    import mlflow.pytorch

    from endopheno.tracking import local_artifacts

    where = mlflow.MlflowClient().get_model_version_download_uri(name, version)
    folder = local_artifacts(where) if where.startswith("file:") else None
    if folder is not None and not folder.exists():
        raise InputError(f"{name}/{version}", f"its artifacts are not at {folder} (was the MLflow store moved without "
                         "its mlartifacts/ folder?)")
    model = mlflow.pytorch.load_model(str(folder) if folder else f"models:/{name}/{version}", map_location="cpu")
    if not isinstance(model, VolumeModel):
        raise InputError(f"{name}/{version}", "is not an endopheno volume model")
    return model.eval()


def to_table(defn: FeatureSet, subjects: list[str], results: dict[str, np.ndarray], name: str, version: str) -> pa.Table:
    """The set's Arrow table, a row per MNI row label of `subjects`: per-dimension columns from the
    embedding, the others from their output."""
    from endopheno.featurestore.definitions import key_columns

    dims = [f"{d:03d}" for d in range(results["embedding"].shape[1])] if "embedding" in results else []
    schema = defn.arrow_schema(dims)
    columns: dict[str, object] = key_columns(subjects)
    d = 0
    for c in defn.expanded_columns(dims):
        if c.output == "embedding":
            columns[c.name] = results["embedding"][:, d]
            d += 1
        else:
            columns[c.name] = results[c.output]
    columns["model_name"] = [name] * len(subjects)
    columns["model_version"] = [version] * len(subjects)
    return pa.table({f.name: pa.array(np.asarray(columns[f.name]) if f.name not in ("subject_id", "session", "model_name", "model_version")
                                      else columns[f.name], type=f.type) for f in schema})


def extract(defn: FeatureSet, p: ExtractParams, model_uri: str | None = None) -> BuildReport:
    """Run the model of `model_uri` (default: the definition's ``producer.model``) over every preprocessed
    subject and commit the rows as a new version of the feature set."""
    import mlflow

    from endopheno.featurestore.store import digest, unchanged_version, write_version
    from endopheno.models.data import NON_FINITE, finite
    from endopheno.models.volume_model import reader
    from endopheno.models.train import device_of
    from endopheno.tracking import git_revision, mlflow_run, tracking_uri
    from endopheno.volumes.preprocess import open_mni, volume_store_digest

    if defn.producer.get("kind") != "model":
        raise InputError(defn.name, f"producer kind {defn.producer.get('kind')!r} is not a model (build it with `features build`)")
    outputs = sorted({c.output for c in defn.columns})
    if None in outputs or set(outputs) - set(OUTPUTS):
        raise InputError(defn.path or defn.name, f"every column needs an output among {', '.join(OUTPUTS)}")
    mlflow.set_tracking_uri(tracking_uri(p.tracking_uri))
    name, version = resolve(model_uri or defn.producer.get("model", ""))
    ds = open_mni(p.volumes)
    provenance = {"model_name": name, "model_version": version, "volume_store_digest": volume_store_digest(ds),
                  "schema_version": defn.schema_version, "params_hash": digest({"outputs": outputs})}
    if mlflow.MlflowClient().get_model_version(name, version).tags.get("covariates") and p.participants:
        # the model reads each subject's covariates: other values, other features
        provenance["participants_sha256"] = hashlib.sha256(Path(p.participants).read_bytes()).hexdigest()
    provenance["input_digest"] = digest({**provenance, "columns": [c.name for c in defn.columns]})
    path = Path(p.store) / defn.name
    if done := unchanged_version(path, provenance["input_digest"]):
        return BuildReport(defn.name, done[0], False, done[1], [], None)

    model = load_model(name, version)
    check_grid(model, ds, f"{name}/{version}")
    task_of = {"probability": "classification", "prediction": "regression"}
    if wrong := [o for o in outputs if task_of.get(o, model.task) != model.task]:
        raise InputError(defn.path or defn.name, f"output {wrong[0]!r} does not apply to {name}/{version}, a "
                                                 f"{model.task} model")
    device = device_of(p.device)
    model.to(device)
    done = np.flatnonzero(np.array(ds.source_sha256.values.tolist(), dtype=str) != "")
    keys = np.array(ds.subject.values.tolist(), dtype=str)
    dataset, done, failed = reader(model, p.volumes, done, keys[done], p.participants)
    loader = torch.utils.data.DataLoader(dataset, batch_size=p.batch_size, num_workers=p.loader_workers)
    log.info("extracting %s with %s version %s from %d subjects", defn.name, name, version, len(done))
    with mlflow_run("endopheno.features", f"extract {defn.name}", uri=p.tracking_uri,
                    tags={"endopheno.kind": "features", "feature_set": defn.name, **{k: str(v) for k, v in provenance.items()}}) as run:
        results = {o: [] for o in outputs}
        subjects, start, t0 = [], 0, time.perf_counter()
        for x, _ in loader:
            rows = keys[done[start:start + len(x)]]
            start += len(x)
            ok = finite(x)
            for subject in rows[~ok.numpy()]:
                failed.append((str(subject), NON_FINITE))   # the reason alone: the report names the subject
            x = x[ok].to(device)
            if not len(x):
                continue
            for o in outputs:
                results[o].append(model.predict(x, o).float().cpu().numpy())
            subjects += rows[ok.numpy()].tolist()
        seconds = time.perf_counter() - t0
        if not subjects:
            raise InputError(p.volumes, "no subject could be extracted")
        results = {o: np.concatenate(v) for o, v in results.items()}
        table = to_table(defn, subjects, results, name, version)
        result = write_version(path, table, {**provenance, "git_revision": git_revision(), "mlflow_run_id": run.info.run_id,
                                             "failed_subjects": [s for s, _ in failed]})
        mlflow.log_params({"model": f"{name}/{version}", "outputs": ",".join(outputs), "device": str(device)})
        mlflow.log_metrics({"subjects": len(subjects), "failed": len(failed), "version": result.version,
                            "volumes_per_s": len(subjects) / seconds})
        mlflow.set_tag("feature_set_version", str(result.version))
    log.info("%s: %d volumes in %.1f s (%.1f volumes/s)", defn.name, len(subjects), seconds, len(subjects) / seconds)
    return BuildReport(defn.name, result.version, result.created, len(subjects), failed, run.info.run_id)
