"""Atlas-region measurements on the MNI volume store: the classic imaging-derived phenotypes (regional
grey-matter volumes and mean intensities, as in UK Biobank's pipeline) that need no trained model.

The atlas. nilearn ships the MNI152 template and its tissue maps but no parcellation (every atlas in
`nilearn.datasets` is downloaded, and the pipeline must run offline), so the default atlas is a
documented, deterministic *geometric* parcellation of the template brain mask into approximate lobes
by MNI coordinate boxes (`LOBES`, applied in order; first match wins), split into left (x < 0) and
right (x > 0) hemispheres; voxels on the midline plane belong to no lobe but to `whole_brain`. These
are coordinate boxes, not anatomy. A real atlas (`features.atlas` in params.yaml: a label image in
MNI152 space and a TSV with columns `index, name`) replaces it; it is resampled to the store's grid by
nearest neighbour.

The measurements, per subject and region:

- ``volume_mm3``: grey-matter volume in the subject's native space,
  ``Σ_v P(GM | T1_v) × voxel volume × |det A|``. ``P(GM | T1)`` is a soft segmentation: a three-class
  Gaussian mixture (CSF < GM < WM, the classic intensity model of Ashburner & Friston 2005,
  NeuroImage 26:839, without its spatial priors) fitted to the subject's brain-mask intensities. After
  affine registration, local atrophy shows as fewer grey-matter voxels in a region; `A` is the linear
  part of the subject's template→native affine, so ``|det A|`` turns template mm³ back into the
  subject's mm³ (head size). Assumes the affine registration succeeded (see `qc_pass`).
- ``mean_t1``: mean z-scored T1 intensity in the region (z-scored inside the brain mask by
  preprocessing), a contrast/tissue-composition measure.
- ``tbm_volume_mm3``: the region's volume by tensor-based morphometry (Ashburner & Friston 2000,
  NeuroImage 11:805; Hua et al. 2008, NeuroImage 43:458): the template region carried through the
  subject's deformation, ``Σ_v J_v × voxel volume × |det A|``, with ``J = exp(mni/logjac)`` the
  non-linear registration's local volume change (`endopheno.volumes.morphometry`). It measures a
  structure's size where the T1 intensity barely does (on the phantom, r = 0.88 with the true
  hippocampal volume vs −0.38 for the mean T1; BENCHMARKS.md). Assumes the demons registration
  matched the template's region to the subject's; null when the store has no log-Jacobian maps
  (`preprocess.morphometry: null`) or a subject's map is unfinished.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from endopheno.errors import InputError

log = logging.getLogger(__name__)

# (name, condition on MNI mm coordinates); first match wins.
LOBES = (
    ("cerebellum", lambda x, y, z: (z < -20) & (y < -45)),
    ("occipital", lambda x, y, z: y < -70),
    ("temporal", lambda x, y, z: (z < -5) & (y < 20)),
    ("frontal", lambda x, y, z: y >= -20),
    ("parietal", lambda x, y, z: np.ones_like(x, dtype=bool)),
)
WHOLE_BRAIN = "whole_brain"


@dataclass(frozen=True)
class Atlas:
    """Integer labels on the store's grid (0 = none) and the region name of each label 1..n.
    `whole_brain` is measured over the brain mask besides the labelled regions."""

    labels: np.ndarray
    names: tuple[str, ...]
    source: str

    @property
    def regions(self) -> list[str]:
        return [*self.names, WHOLE_BRAIN]

    @property
    def digest(self) -> str:
        h = hashlib.sha256(np.ascontiguousarray(self.labels, dtype=np.int32).tobytes())
        h.update("\n".join(self.names).encode())
        return h.hexdigest()[:16]


def geometric_atlas(x: np.ndarray, y: np.ndarray, z: np.ndarray, brain_mask: np.ndarray) -> Atlas:
    """The default parcellation (see the module's docstring) on the grid with coordinates x, y, z (mm)."""
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij")
    labels = np.zeros(brain_mask.shape, dtype=np.int16)
    free = brain_mask.astype(bool).copy()
    names = []
    for lobe, rule in LOBES:
        inside = free & rule(X, Y, Z)
        for side, half in (("L", X < 0), ("R", X > 0)):
            names.append(f"{lobe}_{side}")
            labels[inside & half] = len(names)
        free &= ~inside
    return Atlas(labels, tuple(names), "geometric lobes (endopheno.featurestore.atlas.LOBES)")


def atlas_from_files(labels_path: str | Path, table_path: str | Path, shape: tuple[int, int, int],
                     affine: np.ndarray, reserved: tuple[str, ...] = (WHOLE_BRAIN,)) -> Atlas:
    """A label image (MNI152 space, any grid with a true affine, e.g. the phantom's 1 mm
    ``atlas/regions.nii.gz``) resampled to the grid (`shape`, `affine`) by nearest neighbour, with the
    region names of its table: a TSV with columns ``index, name`` (or ``label, region``). Labels become
    1..n in table order (0 = no region); `reserved` names are refused (they name other measurements)."""
    import nibabel as nib
    import pandas as pd
    from nilearn.image import resample_img

    try:
        img = nib.load(str(labels_path))
        table = pd.read_csv(table_path, sep="\t")
    except (OSError, ValueError) as e:
        raise InputError(labels_path, f"cannot read the atlas ({e})") from None
    if {"index", "name"} <= set(table.columns):
        index, names = table["index"], table["name"].astype(str)
    elif {"label", "region"} <= set(table.columns):
        index, names = table["label"], table["region"].astype(str)
    else:
        raise InputError(table_path, "the atlas table needs columns index and name (or label and region)")
    if clash := sorted(set(names) & set(reserved)):
        raise InputError(table_path, f"region name {clash[0]!r} is reserved")
    on_grid = resample_img(img, target_affine=np.asarray(affine, dtype=np.float64), target_shape=tuple(shape),
                           interpolation="nearest", force_resample=True, copy_header=True)
    data = np.asarray(on_grid.dataobj).astype(np.int32)
    labels = np.zeros(tuple(shape), dtype=np.int16)
    for new, i in enumerate(index, start=1):
        labels[data == int(i)] = new
    return Atlas(labels, tuple(names), f"{labels_path} + {table_path}")


def soft_grey_matter(t1: np.ndarray, seed: int) -> np.ndarray:
    """P(GM | intensity) for brain voxels `t1` (1-D): the middle class of a three-component Gaussian
    mixture, initialised at the 10th, 50th and 90th percentiles so the fit is deterministic. It is
    fitted on every 8th voxel (three 1-D Gaussians are well determined by tens of thousands of points;
    fitting on all of them took 2.5 s per subject at 2 mm) and evaluated on all."""
    from sklearn.mixture import GaussianMixture

    v = t1.reshape(-1, 1).astype(np.float64)
    gmm = GaussianMixture(3, means_init=np.percentile(v, [10, 50, 90]).reshape(3, 1), random_state=seed,
                          max_iter=200, tol=1e-4).fit(v[::8])
    middle = int(np.argsort(gmm.means_.ravel())[1])
    return gmm.predict_proba(v)[:, middle]


def measure_subject(item: tuple[int, str, np.ndarray], *, store: str, modality: str, labels: np.ndarray,
                    brain: np.ndarray, n_regions: int, voxel_mm3: float, seed: int) -> dict:
    """One subject's row: ``volume``, ``mean`` (T1) and ``tbm`` per region (labels 1..n, then the whole
    brain); ``tbm`` is NaN where the subject has no finished log-Jacobian map."""
    import zarr

    row, subject, template_to_native, has_logjac = item
    mni = zarr.open_group(store, mode="r", path="mni")
    t1 = np.asarray(mni[modality][row])[brain]
    if not np.isfinite(t1).all():
        raise InputError(f"subject {subject}", "its MNI volume has non-finite voxels (preprocessing unfinished?)")
    jacobian = abs(float(np.linalg.det(template_to_native[:3, :3])))
    gm = soft_grey_matter(t1, seed) * voxel_mm3 * jacobian
    lab = labels[brain].astype(np.int64)

    def per_region(weights: np.ndarray) -> np.ndarray:
        return np.append(np.bincount(lab, weights=weights, minlength=n_regions + 1)[1:], weights.sum())

    counts = per_region(np.ones_like(t1))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = per_region(t1) / counts
    tbm = np.full(n_regions + 1, np.nan)
    if has_logjac:
        local = np.exp(np.asarray(mni["logjac"][row], dtype=np.float64)[brain])
        tbm = per_region(local * voxel_mm3 * jacobian)
    return {"subject_id": subject, "volume": per_region(gm), "mean": mean, "tbm": tbm}


def measure(store: str | Path, atlas: Atlas, *, modality: str = "T1w", seed: int = 0,
            workers: int | None = None, scheduler: str | None = None) -> tuple[dict[str, dict], list]:
    """Measure every preprocessed subject of the volume store. Returns ({subject: row}, failures),
    failures as ``(subject, reason)``; a failed subject does not stop the others."""
    from endopheno.parallel import map_items
    from endopheno.volumes.preprocess import open_mni

    ds = open_mni(store)
    if modality not in ds:
        raise InputError(store, f"the MNI group has no {modality} volumes (run `endopheno preprocess`)")
    brain = np.asarray(ds.brain_mask.values, dtype=bool)
    if atlas.labels.shape != brain.shape:
        raise InputError(atlas.source, f"atlas grid {atlas.labels.shape} differs from the store's {brain.shape}")
    affine = np.asarray(ds.attrs["affine"])
    done = [i for i, sha in enumerate(ds.source_sha256.values) if sha]
    transforms = np.asarray(ds.template_to_native.values)
    logjac_done = (ds["logjac_source_sha256"].values == ds.source_sha256.values if "logjac_source_sha256" in ds
                   else np.zeros(len(ds.subject), dtype=bool))
    if not logjac_done[done].all():
        log.warning("atlas regions: %d of %d subjects have no log-Jacobian map (preprocess.morphometry): their "
                    "tbm_volume_mm3 is null", int((~logjac_done[done]).sum()), len(done))
    items = [(i, str(ds.subject.values[i]), transforms[i], bool(logjac_done[i])) for i in done]
    shared = {"store": str(store), "modality": modality, "labels": atlas.labels, "brain": brain,
              "n_regions": len(atlas.names), "voxel_mm3": abs(float(np.linalg.det(affine[:3, :3]))), "seed": seed}
    rows, failed = {}, []
    for (_, subject, _, _), result in map_items(measure_subject, items, workers=workers, scheduler=scheduler,
                                             label="atlas regions", shared=shared):
        if isinstance(result, Exception):   # the reason alone: the report names the subject
            failed.append((subject, result.reason if isinstance(result, InputError) else str(result)))
        else:
            rows[subject] = result
    return rows, failed


def to_table(rows: dict[str, dict], atlas: Atlas, schema: pa.Schema, model_name: str, model_version: str) -> pa.Table:
    """The feature set's Arrow table, subjects (MNI row labels) sorted, columns in `schema` order."""
    from endopheno.featurestore.definitions import key_columns

    subjects = sorted(rows)
    columns: dict[str, list] = key_columns(subjects)
    for k, region in enumerate(atlas.regions):
        columns[f"{region}_volume_mm3"] = [float(rows[s]["volume"][k]) for s in subjects]
        columns[f"{region}_mean_t1"] = [float(rows[s]["mean"][k]) for s in subjects]
        columns[f"{region}_tbm_volume_mm3"] = [None if np.isnan(v := rows[s]["tbm"][k]) else float(v) for s in subjects]
    columns["model_name"] = [model_name] * len(subjects)
    columns["model_version"] = [model_version] * len(subjects)
    missing = set(schema.names) - set(columns)
    if missing or set(columns) - set(schema.names):
        raise InputError("atlas_regions", f"the definition's columns and the measurements differ "
                         f"({', '.join(sorted(missing ^ (set(columns) - set(schema.names))))})")
    return pa.table({name: pa.array(columns[name], type=schema.field(name).type) for name in schema.names})


@dataclass(frozen=True)
class FeatureParams:
    """The `features` section of params.yaml."""

    definitions: str = "features"
    store: str = "stores/features"
    volumes: str = "stores/volumes.zarr"
    modality: str = "T1w"
    atlas: dict | None = None           # {labels: MNI label image, table: TSV index,name}; None = geometric lobes
    seed: int = 1                       # of the Gaussian mixture (initialised deterministically anyway)
    workers: int | None = None
    tracking_uri: str | None = None


@dataclass
class BuildReport:
    name: str
    version: int
    created: bool
    subjects: int
    failed: list
    mlflow_run_id: str | None

    def summary(self) -> str:
        what = "new version" if self.created else "unchanged: inputs identical to version"
        return (f"features {self.name}: {what} {self.version}, {self.subjects} subjects"
                + (f", {len(self.failed)} failed" if self.failed else "")
                + (f"; MLflow run {self.mlflow_run_id}" if self.mlflow_run_id else ""))


def load_atlas(p: FeatureParams, ds) -> Atlas:
    if not p.atlas:
        return geometric_atlas(ds.x.values, ds.y.values, ds.z.values, np.asarray(ds.brain_mask.values))
    if set(p.atlas) != {"labels", "table"}:
        raise InputError("params.yaml features.atlas", "give labels: (label image) and table: (TSV index, name)")
    return atlas_from_files(p.atlas["labels"], p.atlas["table"], ds.brain_mask.shape, np.asarray(ds.attrs["affine"]))


def build_atlas_set(defn, p: FeatureParams, *, scheduler: str | None = None) -> BuildReport:
    """Measure the atlas set `defn` on the volume store and commit it as a new version of
    `<p.store>/<name>`, unless the latest version was built from the same inputs (volume store digest,
    atlas, parameters, producer version and schema version) with no subject failed: then nothing is
    measured."""
    from endopheno.featurestore.store import check_schema, digest, unchanged_version, write_version
    from endopheno.tracking import git_revision, mlflow_run
    from endopheno.volumes.preprocess import open_mni, volume_store_digest

    if defn.producer.get("kind") != "atlas":
        raise InputError(defn.name, f"producer kind {defn.producer.get('kind')!r} is not an atlas measurement")
    ds = open_mni(p.volumes)
    atlas = load_atlas(p, ds)
    schema = defn.arrow_schema(atlas.regions)
    provenance = {"model_name": defn.model_name, "model_version": defn.model_version,
                  "volume_store_digest": volume_store_digest(ds), "schema_version": defn.schema_version,
                  "params_hash": digest({"modality": p.modality, "atlas": atlas.digest, "seed": p.seed})}
    provenance["input_digest"] = digest({**provenance, "schema": schema.to_string()})
    path = Path(p.store) / defn.name
    if done := unchanged_version(path, provenance["input_digest"]):
        return BuildReport(defn.name, done[0], False, done[1], [], None)
    check_schema(path, schema, defn.schema_version)
    log.info("measuring %d regions (%s) on %s", len(atlas.regions), atlas.source, p.volumes)
    with mlflow_run("endopheno.features", f"features {defn.name}", uri=p.tracking_uri,
                    tags={"endopheno.kind": "features", "feature_set": defn.name, **{k: str(v) for k, v in provenance.items()}}) as run:
        import mlflow

        rows, failed = measure(p.volumes, atlas, modality=p.modality, seed=p.seed, workers=p.workers, scheduler=scheduler)
        if not rows:
            raise InputError(p.volumes, "no subject could be measured")
        table = to_table(rows, atlas, schema, defn.model_name, defn.model_version)
        result = write_version(path, table, {**provenance, "git_revision": git_revision(), "mlflow_run_id": run.info.run_id,
                                             "failed_subjects": [s for s, _ in failed]})
        mlflow.log_params({"atlas": atlas.source, "regions": len(atlas.regions), "modality": p.modality, "seed": p.seed})
        mlflow.log_metrics({"subjects": len(rows), "failed": len(failed), "version": result.version})
        mlflow.set_tag("feature_set_version", str(result.version))
    return BuildReport(defn.name, result.version, result.created, len(rows), failed, run.info.run_id)
