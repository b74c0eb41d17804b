"""The `attribute` step: explain a registered model and write what it found.

``endopheno attribute --model endopheno.cnn3d@champion`` resolves the alias to a version, loads it from
the registry and reads the volume store as extraction does (`VolumeDataset` at the model's grid). Then:

- Heatmaps (`endopheno.attribution.heatmaps`): each method of `AttributeParams.methods` explains the
  positive class (or the regression output) for `subjects` subjects, chosen deterministically and
  stratified by diagnosis (`choose_subjects`). A method that cannot explain the model
  (`MethodNotApplicable`: the autoencoder for all, LRP for residual and slice networks) is skipped and
  reported. Group averages (each diagnosis, ``all``, ``correct``: correctly classified) are written as
  NIfTI with the model's affine, ``<out>/<model>/<method>_<group>.nii.gz``, with figures of the positive
  group's map (ortho slices over the store's template, glass brain) beside them.
- Checks: IG's completeness error (median, max over the subjects) and the model-randomisation test
  (Adebayo et al. 2018): the median Spearman correlation of |map| between the model and a copy with
  re-initialised weights, over the first `randomisation_subjects` subjects (``checks.tsv``).
- With a truth map (the phantom's ``ground_truth/ad_atrophy_map.nii.gz``, resampled onto the model grid
  with its true affine): the positive group's map of each method scored against ``|truth| >
  truth_threshold`` (`score_map`: Dice at the top 1/5/10 %, ROC AUC, Pearson r with |truth|), beside
  the AUC's jackknife standard error over the subjects averaged (``auc_se``), the
  randomised model's AUC over the first `randomisation_subjects` subjects beside the model's over the same
  ones (``auc_on_control_subjects``: what the randomisation check compares) and the baseline row ``svm_haufe``: the activation pattern (Haufe et al.
  2014) of a linear SVM fitted on the cohort's voxels (``scores.tsv``).
- For an autoencoder: the latent-to-region table (`endopheno.attribution.regions`) over the region atlas
  of `regions`, as ``latent_regions.parquet`` (the catalog's ``attribution.latent_regions`` view).

Everything for one model is written to a staging folder and moved into place at the end, so a crash
leaves the previous output whole; it is logged as artifacts of an MLflow run (experiment
``endopheno.attribution``) tagged with the model name and version, and the model version gets the tag
``attribution_run``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from endopheno.attribution.heatmaps import (METHODS, MethodNotApplicable, attribute, completeness, randomised_copy,
                                            rank_correlation)
from endopheno.attribution.nifti import group_average, write_map
from endopheno.attribution.score import below_randomised, haufe_pattern, jackknife_auc_se, score_map
from endopheno.errors import InputError
from endopheno.models.data import NON_FINITE, finite
from endopheno.models.volume_model import VolumeModel, check_grid

log = logging.getLogger(__name__)

SVM_ROW = "svm_haufe"
EXPERIMENT = "endopheno.attribution"

__all__ = ["AttributeParams", "AttributionReport", "MethodResult", "SVM_ROW", "attribute_model", "choose_subjects",
           "explained_subjects", "model_uris", "plot_map", "svm_pattern", "truth_on_grid"]


@dataclass(frozen=True)
class AttributeParams:
    """The ``attribute`` section of params.yaml."""

    models: tuple[str, ...] = ("cnn3d", "autoencoder3d")   # train.models entries `dvc repro` explains
    alias: str = "champion"             # ... as endopheno.NAME@alias
    methods: tuple[str, ...] = METHODS
    subjects: int = 40                  # explained per model (stratified by diagnosis)
    seed: int = 1                       # subject choice, randomised model, SVM folds
    store: str = "stores/volumes.zarr"
    participants: str = "data/phantom/bids/participants.tsv"
    classes: tuple[str, str] = ("CN", "AD")   # negative, positive: the SVM's classes; the positive group is scored
    out: str = "stores/attribution"
    device: str = "auto"
    batch_size: int = 8                 # subjects per attribution call
    baseline: str = "zeros"             # IG and occlusion reference: zeros (training mean) | mean (CN mean image) | blurred
    blur_sigma: float = 2.0             # voxels, for baseline: blurred
    ig_steps: int = 50
    ig_max_steps: int = 800             # subjects missing completeness by > ig_tolerance get doubled steps up to this
    ig_tolerance: float = 0.01
    occlusion_window: int = 8           # cube side, model voxels
    occlusion_stride: int = 4
    occlusion_batch: int = 16           # occluded copies per forward pass
    randomisation_subjects: int = 8     # subjects of the model-randomisation check
    subject_maps: bool = True           # also write every subject's map (subjects/<subject>_<method>.nii.gz)
    truth: str | None = None            # truth map (phantom: ground_truth/ad_atrophy_map.nii.gz); null for real cohorts
    truth_threshold: float = 0.0        # binary truth: |truth| > this
    svm_c: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)   # the baseline SVM's C, chosen by 3-fold CV
    regions: dict | None = None         # {labels: label image, table: TSV index,name or label,region}
    k: float = 2.0                      # latent perturbation, in the cohort's SDs
    figures: bool = True
    tracking_uri: str | None = None


def load_attribute_params(section: dict | None) -> AttributeParams:
    from endopheno.params import from_section

    p = from_section(AttributeParams, section, "attribute")
    methods = (p.methods,) if isinstance(p.methods, str) else tuple(p.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError("attribute.methods", f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    if p.regions is not None and set(p.regions) != {"labels", "table"}:
        raise InputError("attribute.regions", "give labels: (label image) and table: (TSV index, name)")
    if p.subjects < 1:
        raise InputError("attribute.subjects", f"must be at least 1, got {p.subjects}")
    return AttributeParams(**{**asdict(p), "models": tuple(p.models), "methods": methods,
                              "classes": tuple(p.classes), "svm_c": tuple(float(c) for c in p.svm_c)})


def model_uris(p: AttributeParams, models=None) -> list[str]:
    """The registry references of `models` (default ``p.models``): a train.models entry NAME or a registered
    name becomes ``endopheno.NAME@alias``; ``NAME@ALIAS`` and ``NAME/VERSION`` are kept."""
    from endopheno.models.train import REGISTRY_PREFIX

    out = []
    for m in p.models if models is None else models:
        if "@" in m or "/" in m:
            out.append(m)
        else:
            out.append(f"{m if m.startswith(REGISTRY_PREFIX) else REGISTRY_PREFIX + m}@{p.alias}")
    return out


# ---- results ---------------------------------------------------------------------------------------

@dataclass
class MethodResult:
    """One method on one model: ``ok`` with its checks, or ``skipped`` with the reason."""

    method: str
    status: str
    reason: str = ""
    subjects: int = 0
    seconds: float = math.nan
    completeness_median: float = math.nan       # IG: |Σ attr − (f(x) − f(x′))| / |f(x) − f(x′)|
    completeness_max: float = math.nan
    randomisation_rank_correlation: float = math.nan   # median Spearman of |map|, model vs randomised copy


@dataclass
class AttributionReport:
    model: str
    version: str
    out: Path
    methods: list[MethodResult] = field(default_factory=list)
    subjects: int = 0
    failed: list = field(default_factory=list)      # (subject, reason)
    scores: pd.DataFrame | None = None
    latent_regions: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
    run_id: str | None = None
    seconds: float = 0.0

    @property
    def skipped(self) -> list[MethodResult]:
        return [m for m in self.methods if m.status == "skipped"]

    def summary(self) -> str:
        done = [m.method for m in self.methods if m.status == "ok"]
        text = f"attribute {self.model}/{self.version}: "
        text += (f"{len(done)} method(s) on {self.subjects} subjects" if done else "no heatmap method applies")
        if self.skipped:
            text += f", {len(self.skipped)} skipped"
        if self.scores is not None:
            heat = self.scores[self.scores.method != SVM_ROW]
            best = heat.loc[heat.auc.idxmax()]
            svm = self.scores[self.scores.method == SVM_ROW]
            text += f"; best AUC vs truth {best.auc:.3f} ({best.method})"
            if len(svm):
                text += f", SVM pattern {svm.auc.iloc[0]:.3f}"
        if self.latent_regions is not None:
            text += f"; latent-to-region map of {self.latent_regions.dimension.nunique()} dimensions"
        if self.failed:
            text += f"; {len(self.failed)} subject(s) failed"
        return text + f"; written to {self.out} in {self.seconds:.1f} s" + (f"; MLflow run {self.run_id}" if self.run_id else "")


# ---- subjects and inputs -----------------------------------------------------------------------------

def choose_subjects(subjects, diagnosis, n: int, seed: int) -> np.ndarray:
    """Indices of `n` subjects, stratified by diagnosis and deterministic: within each diagnosis, subjects
    are ordered by a hash of (seed, subject) and spread evenly over the list, so every prefix of the
    result is stratified too (the randomisation check uses one) and adding subjects to the cohort
    rarely changes who is chosen."""
    subjects, diagnosis = np.asarray(subjects, dtype=str), np.asarray(diagnosis, dtype=str)
    position = np.empty(len(subjects))
    for label in np.unique(diagnosis):
        members = np.flatnonzero(diagnosis == label)
        keys = [hashlib.sha256(f"{seed}:{s}".encode()).hexdigest() for s in subjects[members]]
        ordered = members[np.argsort(keys, kind="stable")]
        position[ordered] = (np.arange(len(ordered)) + 0.5) / len(ordered)
    return np.lexsort((diagnosis, position))[:n]


def _reader(p: AttributeParams, model: VolumeModel, rows: np.ndarray, subjects: np.ndarray):
    """The store's subjects `rows` at the model's grid, read exactly as extraction reads them (`_usable`
    has left out those without the model's covariates)."""
    from endopheno.models.volume_model import reader

    return reader(model, p.store, rows, subjects, p.participants)[0]


def _usable(p: AttributeParams, model: VolumeModel, ds, task: str, **kwargs):
    """The store's subjects usable for `task` (models/data.task_data) that have the model's covariates."""
    from endopheno.models.data import task_data

    return task_data(ds, p.participants, task, covariates=tuple(getattr(model, "covariates", {})), **kwargs)


def _batches(reader, subjects: np.ndarray, batch_size: int, failed: list):
    """(indices, subjects, x) batches of finite volumes; a subject with non-finite voxels is reported in
    `failed` and left out (the others go on)."""
    for start in range(0, len(reader), batch_size):
        idx = np.arange(start, min(start + batch_size, len(reader)))
        x = torch.stack([reader.volume(int(i)) for i in idx])
        ok = finite(x).numpy()
        for s in subjects[idx[~ok]]:
            failed.append((str(s), NON_FINITE))
        if ok.any():
            yield idx[ok], subjects[idx[ok]], x[torch.from_numpy(ok)]


def explained_subjects(p: AttributeParams, model: VolumeModel, data, failed: list):
    """The `p.subjects` subjects that attribution explains (`choose_subjects` among the usable `data`
    with a diagnosis), read onto the model's device: (x ``[N, C, X, Y, Z]``, subjects, diagnosis). A
    subject that cannot be read is reported in `failed` and left out."""
    known = np.flatnonzero(~np.isin(data.diagnosis, ["", "nan"]))
    if not len(known):
        raise InputError(p.participants, "no usable subject has a diagnosis to stratify by")
    chosen = known[choose_subjects(data.subjects[known], data.diagnosis[known], p.subjects, p.seed)]
    kept, xs = [], []
    for idx, _, x in _batches(_reader(p, model, data.rows[chosen], data.subjects[chosen]), data.subjects[chosen],
                              p.batch_size, failed):
        kept.append(idx), xs.append(x)
    if not xs:
        raise InputError(p.store, "no subject could be read for attribution")
    kept = np.concatenate(kept)
    return torch.cat(xs).to(model.mask.device), data.subjects[chosen][kept], data.diagnosis[chosen][kept]


def truth_on_grid(path: str | Path, shape: tuple[int, int, int], affine) -> np.ndarray:
    """A truth map (any grid with its true affine) sampled at the model grid's voxel centres (linear
    interpolation, `endopheno.mni.resample`: the resampler of every other grid change)."""
    import nibabel as nib

    from endopheno.mni import resample

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float64)
    except (OSError, ValueError) as e:
        raise InputError(path, f"cannot read the truth map ({e})") from None
    return resample(data, img.affine, tuple(shape), np.asarray(affine, dtype=np.float64)).astype(np.float64)


def svm_pattern(voxels: np.ndarray, target: np.ndarray, c_grid, seed: int) -> tuple[np.ndarray, float, float]:
    """The activation pattern (Haufe et al. 2014) of a linear SVM on brain voxels ``[n, p]``, the
    baseline every heatmap should beat.

    The method of the training baseline (`endopheno.models.train.linear_baseline`): voxels standardised
    with the subjects' means and SDs, ``LinearSVC``; but on the maps as `reader` gives them (adjusted for
    the model's covariates, before its high-pass and mirror averaging), the space the heatmaps are in; C is chosen from `c_grid` by stratified 3-fold
    cross-validation (balanced accuracy), then the SVM is fitted on every subject. Returns (pattern
    ``[p]``, C, cross-validated balanced accuracy)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.svm import LinearSVC

    target = np.asarray(target)
    counts = np.unique(target, return_counts=True)[1]
    if len(counts) < 2 or counts.min() < 2:
        raise InputError("svm baseline", f"needs at least 2 subjects of each class, has {counts.tolist()}")
    z = (voxels - voxels.mean(0)) / (voxels.std(0) + 1e-6)
    search = GridSearchCV(LinearSVC(max_iter=20000, random_state=seed), {"C": list(c_grid)}, scoring="balanced_accuracy",
                          cv=StratifiedKFold(min(3, int(counts.min())), shuffle=True, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        search.fit(z, target)
    weights = search.best_estimator_.coef_[0]
    return haufe_pattern(weights, z), float(search.best_params_["C"]), float(search.best_score_)


# ---- figures -----------------------------------------------------------------------------------------

def _background(ds):
    import nibabel as nib

    from endopheno import mni

    if "template" in ds:
        return nib.Nifti1Image(np.asarray(ds.template.values, dtype=np.float32), np.asarray(ds.attrs["affine"]))
    return mni.t1()


def plot_map(volume, affine, mask, path: Path, title: str, *, background=None, kind: str = "ortho") -> Path:
    """A map as a PNG: ``ortho`` slices over `background` (nilearn `plot_stat_map`) or a ``glass`` brain
    (`plot_glass_brain`), thresholded at the 90th percentile of |map| inside `mask`, so the strongest tenth
    shows."""
    import matplotlib

    matplotlib.use("Agg")
    import nibabel as nib
    from nilearn import plotting

    volume = np.asarray(volume, dtype=np.float32)
    inside = np.abs(volume[np.asarray(mask) > 0])
    threshold = float(np.percentile(inside, 90)) if inside.size and inside.max() > 0 else None
    img = nib.Nifti1Image(volume, np.asarray(affine, dtype=np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # nilearn's notices about resampling and non-finite values
        if kind == "ortho":
            display = plotting.plot_stat_map(img, bg_img=background, threshold=threshold, title=title,
                                             draw_cross=False, black_bg=False)
        else:
            display = plotting.plot_glass_brain(img, threshold=threshold, title=title, plot_abs=False, colorbar=True)
        display.savefig(str(path), dpi=90)
        display.close()
    return path


# ---- the step ----------------------------------------------------------------------------------------

def _attribute_kwargs(p: AttributeParams, mean_image) -> dict:
    return dict(baseline=p.baseline, mean_image=mean_image, blur_sigma=p.blur_sigma, steps=p.ig_steps,
                tolerance=p.ig_tolerance, max_steps=p.ig_max_steps, window=p.occlusion_window,
                stride=p.occlusion_stride, perturbations_per_eval=p.occlusion_batch)


def _why(e: MethodNotApplicable) -> str:
    return e.reason.removeprefix(f"{e.method} does not apply: ")


def _maps(model, x: torch.Tensor, method: str, kwargs: dict, batch_size: int) -> np.ndarray:
    """[N, X, Y, Z] maps, channels summed (a voxel's total attribution), outside the mask 0."""
    mask = model.mask.cpu().numpy()
    parts = [attribute(model, x[s:s + batch_size], method, **kwargs).sum(1) * mask for s in range(0, len(x), batch_size)]
    return np.concatenate(parts).astype(np.float32)


def _heatmaps(p: AttributeParams, model: VolumeModel, label: str, ds, out: Path, report: AttributionReport,
              truth: np.ndarray | None, background) -> None:
    import mlflow

    if model.task == "reconstruction":
        # No method explains a volume output; ask each (without reading a subject) for its reason.
        empty = torch.zeros(0, len(model.inputs), *model.mask.shape, device=model.mask.device)
        for method in p.methods:
            try:
                attribute(model, empty, method)
            except MethodNotApplicable as e:
                report.methods.append(MethodResult(method, "skipped", _why(e)))
        return
    data = _usable(p, model, ds, "reconstruction")                   # every usable subject, with its diagnosis
    x, subjects, diagnosis = explained_subjects(p, model, data, report.failed)
    report.subjects = len(subjects)
    mask = model.mask.cpu().numpy() > 0

    table = pd.DataFrame({"subject": subjects, "diagnosis": diagnosis})
    groups = {c: diagnosis == c for c in dict.fromkeys([*p.classes, *sorted(set(diagnosis))]) if (diagnosis == c).any()}
    groups["all"] = np.ones(len(subjects), bool)
    with torch.no_grad():
        outputs = model(x).float().cpu()
    if model.task == "classification" and model.classes:
        predicted = np.asarray(model.classes)[outputs.argmax(1).numpy()]
        table["probability"] = torch.softmax(outputs, 1)[:, -1].numpy()
        table["predicted"] = predicted
        table["correct"] = predicted == diagnosis
        groups["correct"] = table["correct"].to_numpy()
    elif model.task == "regression":
        table["prediction"] = outputs[:, 0].numpy() * model.target_sd + model.target_mean
    table.to_csv(out / "subjects.tsv", sep="\t", index=False)
    positive = p.classes[-1] if p.classes[-1] in groups else "all"

    mean_image = None
    if p.baseline == "mean":   # the controls' mean image, over every control of the cohort
        negative = np.flatnonzero(data.diagnosis == p.classes[0])
        if not len(negative):
            raise InputError("attribute.baseline", f"'mean' needs {p.classes[0]} subjects; there are none")
        total, n = 0, 0
        for _, _, xb in _batches(_reader(p, model, data.rows[negative], data.subjects[negative]), data.subjects[negative], p.batch_size, []):
            total, n = total + xb.sum(0), n + len(xb)
        mean_image = (total / n).to(model.mask.device)
    kwargs = _attribute_kwargs(p, mean_image)
    randomised, n_random = None, min(p.randomisation_subjects, len(subjects))
    group_maps, positive_maps = {}, {}
    for method in p.methods:
        t0 = time.perf_counter()
        try:
            maps = _maps(model, x, method, kwargs, p.batch_size)
        except MethodNotApplicable as e:
            log.debug("%s: %s", label, e)
            report.methods.append(MethodResult(method, "skipped", _why(e)))
            continue
        result = MethodResult(method, "ok", subjects=len(subjects), seconds=time.perf_counter() - t0)
        if method == "integrated_gradients":
            error = completeness(model, x, maps, p.baseline, mean_image=mean_image, blur_sigma=p.blur_sigma)
            result.completeness_median, result.completeness_max = float(np.median(error)), float(np.max(error))
        if n_random:
            if randomised is None:
                randomised = randomised_copy(model, p.seed)
            # The control's maps are only ranked against the model's: IG's completeness need not be chased
            # on a random network (it took 4x the model's own IG time, up to 800 steps, for nothing).
            control = _maps(randomised, x[:n_random], method, {**kwargs, "tolerance": math.inf}, p.batch_size)
            rho = [rank_correlation(a, b, mask, absolute=True) for a, b in zip(maps[:n_random], control)]
            result.randomisation_rank_correlation = float(np.nanmedian(rho)) if np.isfinite(rho).any() else math.nan
            # Compared on the same subjects: the model's own map over them as well as the control's
            members = groups[positive][:n_random]
            members = members if members.any() else None
            group_maps[f"{method}.randomised"] = group_average(control, members)
            group_maps[f"{method}.control_subjects"] = group_average(maps[:n_random], members)
        report.methods.append(result)
        for group, members in groups.items():
            if not members.any():
                continue
            average = group_average(maps, members)
            write_map(out / f"{method}_{group}.nii.gz", average, model.affine)
            if group == positive:
                group_maps[method], positive_maps[method] = average, maps[members]
        if p.subject_maps:
            for subject, m in zip(subjects, maps):
                write_map(out / "subjects" / f"{subject}_{method}.nii.gz", m, model.affine)
        if p.figures:
            for kind in ("ortho", "glass"):
                plot_map(group_maps[method], model.affine, mask, out / f"{method}_{positive}_{kind}.png",
                         f"{label} {method} ({positive}, n={int(groups[positive].sum())})", background=background,
                         kind=kind)
    for r in report.methods:
        mlflow.log_metrics({f"{r.method}_{k}": v for k, v in asdict(r).items()
                            if k in ("seconds", "completeness_median", "completeness_max",
                                     "randomisation_rank_correlation") and np.isfinite(v)})

    if truth is None or not any(m.status == "ok" for m in report.methods):
        return
    scored = np.abs(truth)
    rows = []
    for r in report.methods:
        if r.status != "ok":
            continue
        s = score_map(group_maps[r.method], scored, mask, binary_truth=True, threshold=p.truth_threshold)
        s["auc_se"] = jackknife_auc_se(positive_maps[r.method], scored, mask, threshold=p.truth_threshold)
        for column, key in (("auc_randomised", "randomised"), ("auc_on_control_subjects", "control_subjects")):
            control = group_maps.get(f"{r.method}.{key}")
            s[column] = (score_map(control, scored, mask, binary_truth=True, threshold=p.truth_threshold)["auc"]
                         if control is not None else math.nan)
        rows.append({"method": r.method, **s})
    try:
        rows.append({"method": SVM_ROW, **_svm_scores(p, model, ds, out, scored, mask, background, label, report)})
    except InputError as e:                      # too few subjects of a class: the heatmaps' scores still stand
        report.notes.append(f"no SVM baseline: {e}")
    scores = pd.DataFrame(rows)
    scores.insert(1, "group", positive)
    scores.insert(2, "truth_voxels", int((scored[mask] > p.truth_threshold).sum()))
    scores.to_csv(out / "scores.tsv", sep="\t", index=False, float_format="%.6g")
    report.scores = scores
    report.notes += below_randomised(scores)
    for row in rows:
        mlflow.log_metrics({f"{row['method']}_{k}": float(v) for k, v in row.items()
                            if k != "method" and isinstance(v, float) and np.isfinite(v)})


def _svm_scores(p, model, ds, out, scored, mask, background, label, report) -> dict:
    """The linear SVM's pattern on the model's grid, written as ``svm_haufe.nii.gz`` and scored."""
    data = _usable(p, model, ds, "classification", classes=p.classes)
    inside = torch.from_numpy(mask)
    voxels, target = [], []
    for idx, _, x in _batches(_reader(p, model, data.rows, data.subjects), data.subjects, 32, []):
        voxels.append(x[:, 0][:, inside].numpy()), target.append(data.target[idx])
    target = np.concatenate(target)
    pattern, c, accuracy = svm_pattern(np.concatenate(voxels), target, p.svm_c, p.seed)
    volume = np.zeros(mask.shape, dtype=np.float32)
    volume[mask] = pattern
    write_map(out / f"{SVM_ROW}.nii.gz", volume, model.affine)
    if p.figures:
        for kind in ("ortho", "glass"):
            plot_map(volume, model.affine, mask, out / f"{SVM_ROW}_{kind}.png",
                     f"{label} grid: linear SVM pattern (C={c:g})", background=background, kind=kind)
    report.notes.append(f"SVM baseline: C {c:g} chosen by 3-fold CV (balanced accuracy {accuracy:.3f}), fitted on "
                        f"{len(target)} subjects")
    return {**score_map(volume, scored, mask, binary_truth=True, threshold=p.truth_threshold),
            "auc_randomised": math.nan, "auc_on_control_subjects": math.nan}


def _latent_regions(p: AttributeParams, model: VolumeModel, name: str, version: str, ds, out: Path,
                    report: AttributionReport) -> None:
    import mlflow

    from endopheno.attribution.regions import BACKGROUND, latent_regions, top_regions
    from endopheno.featurestore.atlas import atlas_from_files

    if p.regions is None:
        report.notes.append("no latent-to-region map: attribute.regions names no label image")
        return
    atlas = atlas_from_files(p.regions["labels"], p.regions["table"], tuple(model.mask.shape), model.affine,
                             reserved=(BACKGROUND,))
    data = _usable(p, model, ds, "reconstruction")
    latents = []
    with torch.no_grad():
        for _, _, x in _batches(_reader(p, model, data.rows, data.subjects), data.subjects, p.batch_size, report.failed):
            latents.append(model.embed(x.to(model.mask.device)).float().cpu().numpy())
    if sum(len(z) for z in latents) < 2:
        raise InputError(p.store, "fewer than 2 subjects could be embedded: no cohort mean and SD of the latents")
    latents = np.concatenate(latents)
    table = latent_regions(model, latents, atlas, p.k)
    table.insert(0, "model_version", version)
    table.insert(0, "model_name", name)
    table["k"] = float(p.k)
    table["cohort_subjects"] = len(latents)
    table.to_parquet(out / "latent_regions.parquet", index=False)
    top_regions(table).to_csv(out / "top_regions.tsv", sep="\t", index=False, float_format="%.4g")
    report.latent_regions = table
    dead = int(table.groupby("dimension").share.apply(lambda s: s.isna().all()).sum())
    mlflow.log_metrics({"latent_dimensions": table.dimension.nunique(), "latent_cohort_subjects": len(latents),
                        "latent_dead_dimensions": dead})


def attribute_model(p: AttributeParams, model_uri: str) -> AttributionReport:
    """Explain the registered model `model_uri` (``NAME@ALIAS`` or ``NAME/VERSION``) as the module's
    docstring says; the output goes to ``<p.out>/<model>/`` (``<model>`` = NAME without ``endopheno.``)."""
    import mlflow

    from endopheno.models.architectures import Autoencoder3d
    from endopheno.models.extract import load_model, resolve
    from endopheno.models.train import REGISTRY_PREFIX, device_of
    from endopheno.tracking import mlflow_run, tracking_uri
    from endopheno.volumes.preprocess import open_mni, volume_store_digest

    t0 = time.perf_counter()
    mlflow.set_tracking_uri(tracking_uri(p.tracking_uri))
    name, version = resolve(model_uri)
    ds = open_mni(p.store)
    model = load_model(name, version)
    label = f"{name}/{version}"
    check_grid(model, ds, label)
    model.to(device_of(p.device))
    truth = truth_on_grid(p.truth, tuple(model.mask.shape), model.affine) if p.truth else None
    final = Path(p.out) / name.removeprefix(REGISTRY_PREFIX)
    staging = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    report = AttributionReport(name, version, final)
    client = mlflow.MlflowClient()
    tags = {"endopheno.kind": "attribution", "model_name": name, "model_version": version,
            "architecture": model.architecture, "training_run": client.get_model_version(name, version).run_id or "",
            "volume_store_digest": volume_store_digest(ds)}
    try:
        with mlflow_run(EXPERIMENT, f"attribute {label}", uri=p.tracking_uri, tags=tags) as run:
            report.run_id = run.info.run_id
            mlflow.log_params({"model": label, "methods": ",".join(p.methods), "subjects": p.subjects, "seed": p.seed,
                               "baseline": p.baseline, "ig_steps": p.ig_steps, "occlusion_window": p.occlusion_window,
                               "occlusion_stride": p.occlusion_stride, "truth": p.truth or "",
                               "truth_threshold": p.truth_threshold, "k": p.k,
                               "regions": (p.regions or {}).get("labels", "")})
            _heatmaps(p, model, label, ds, staging, report, truth, _background(ds))
            if isinstance(model.net, Autoencoder3d) or model.task == "reconstruction":
                _latent_regions(p, model, name, version, ds, staging, report)
            checks = pd.DataFrame([asdict(m) for m in report.methods])
            checks.to_csv(staging / "checks.tsv", sep="\t", index=False, float_format="%.6g")
            if report.failed:
                pd.DataFrame(report.failed, columns=["subject", "reason"]).to_csv(staging / "failed.tsv", sep="\t",
                                                                                 index=False)
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            if final.exists():
                os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
            mlflow.log_artifacts(str(final), artifact_path="attribution")
            mlflow.log_metrics({"subjects": report.subjects, "failed": len(report.failed),
                                "skipped_methods": len(report.skipped)})
            client.set_model_version_tag(name, version, "attribution_run", run.info.run_id)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.seconds = time.perf_counter() - t0
    log.debug(report.summary())
    return report
