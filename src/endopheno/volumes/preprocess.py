"""Preprocess: native volumes -> one analysis-ready array per modality in template (MNI) space.

Per subject: reorient to RAS (an exact voxel permutation, nibabel), N4 bias-field correction
(Tustison et al. 2010, IEEE TMI 29:1310; SimpleITK), affine registration to the MNI152 template
(rigid then affine, Mattes mutual information, multi-resolution; SimpleITK), resampling onto the
template grid at `voxel_size_mm`, the template's brain mask, and z-scoring inside it. A subject whose
correlation with the template falls below `qc_min_correlation` is registered again with fallback
settings; if every attempt fails it is flagged (`qc_pass` false, a `note` says why), not dropped.

Store layout (group `mni`, readable with ``xr.open_zarr(store, group="mni")``):

    <modality>       (subject, x, y, z) float32, one chunk per subject, NaN until processed
    brain_mask       (x, y, z) bool;  template (x, y, z) float32, the template on this grid
    template_to_native (subject, row, col): affine, template mm -> the subject's scanner mm (RAS)
    qc_correlation, qc_pass, source_sha256, note (subject)

Crash safety: rows are added (and the metadata published) before any subject is processed, each
subject's volume is one chunk written atomically, and a subject counts as done only once its
`source_sha256` is written, after its volume: a crash leaves a readable store and a rerun redoes
only what was not finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import xarray as xr
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from endopheno import mni
from endopheno.errors import EndophenoError
from endopheno.parallel import map_items
from endopheno.volumes.store import MNI, ScanKey, content_digest, image_from, iter_native, open_group, open_store, publish

log = logging.getLogger(__name__)

# Preprocessed volumes are read over and over by training, so the default stores them uncompressed
# (8.8x faster to read than .nii.gz at 2 mm, 2.7x the disk); "lz4" is the compact choice for large
# cohorts (3.8x faster than .nii.gz at 2 mm, 7.3x at 1 mm, as small as gzip). benchmarks/bench_read.py.
CODECS = {"none": None, "lz4": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), "zstd": ZstdCodec(level=0)}
# Bumped when the algorithm changes in a way params do not show: the group is then rebuilt, so that
# every subject of a store is processed the same way.
ALGORITHM_VERSION = 3  # 3: registration on a copy of the scan at registration_voxel_mm

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # ITK's physical frame is LPS; NIfTI's is RAS
# Keys of params.yaml's `preprocess` section that are the stage's, not the algorithm's
STAGE_KEYS = frozenset({"store", "digest", "qc_dir", "workers", "morphometry"})


@dataclass(frozen=True)
class PreprocessParams:
    modality: str = "T1w"
    voxel_size_mm: float = 2.0          # output grid
    crop_margin_mm: float | None = 6.0  # crop to the brain's bounding box plus this; None keeps the whole template
    registration_voxel_mm: float = 3.0  # grid on which registration is optimised
    n4_shrink: int = 4
    n4_iterations: tuple[int, ...] = (30, 20)
    registration_iterations: int = 100
    pyramid: tuple[int, ...] = (4, 2)   # shrink factors of the rigid stage's coarse-to-fine levels; (2, 1) left 2 of 400 misregistered
    min_step_mm: float = 0.01           # the optimiser stops when its step falls below this (0.001: same error, 1.3x the time)
    rigid_first: bool = True           # a rigid stage first: without it 4% of phantom subjects misregister
    sampling_fraction: float = 0.1
    sampling: str = "regular"          # "regular" (a jittered grid) or "random" voxel sampling for the metric
    qc_min_correlation: float = 0.75
    codec: str = "none"                 # of the preprocessed volumes: "none" (fastest reads), "lz4" or "zstd"
    seed: int = 1                       # for the metric's sampling; 0 would mean "the wall clock" to ITK

    def __post_init__(self):
        # A whole number given for a float knob (`voxel_size_mm: 2`) is the same parameter as 2.0: the
        # same digest, so no rebuild. Sequences are tuples (hashable, as the lru_caches need).
        for name, f in self.__dataclass_fields__.items():
            value = getattr(self, name)
            if f.type in ("float", "float | None") and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))
            elif isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessParams":
        """From params.yaml's `preprocess` section. The stage's own keys (`STAGE_KEYS`) are skipped; any
        other key that is not a parameter is an error (a typo must not silently fall back to a default)."""
        from endopheno.params import from_section

        return from_section(cls, d, "preprocess", ignore=STAGE_KEYS)

    def digest(self) -> str:
        """Identity of the output: params and algorithm version (a change rebuilds the group)."""
        identity = {**self.__dict__, "algorithm": ALGORITHM_VERSION}
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=list).encode()).hexdigest()[:16]


# ---- image conversions ---------------------------------------------------------------------------

def to_sitk(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A SimpleITK image from an array in (i, j, k) order and its RAS affine."""
    lps = LPS @ affine
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(0))
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.T, dtype=np.float32))
    img.SetSpacing(spacing.tolist())
    img.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    img.SetOrigin(lps[:3, 3].tolist())
    return img


def transform_to_ras(tx: sitk.Transform) -> np.ndarray:
    """4x4 RAS matrix of an ITK affine (or rigid) transform given in LPS."""
    m = np.eye(4)
    a = np.asarray(tx.GetMatrix()).reshape(3, 3)
    c = np.asarray(tx.GetCenter())
    m[:3, :3] = a
    m[:3, 3] = c + np.asarray(tx.GetTranslation()) - a @ c
    return LPS @ m @ LPS


@lru_cache(maxsize=4)
def target_grid(voxel_size_mm: float, crop_margin_mm: float | None) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray, np.ndarray]:
    """(shape, affine, template, brain mask) of the output grid."""
    shape, affine = mni.template_grid(voxel_size_mm, crop_margin_mm)
    t1 = mni.t1()
    template = mni.resample(mni.smooth_to(t1, voxel_size_mm), t1.affine, shape, affine)
    mask_img = mni.brain_mask()
    mask = mni.resample(np.asarray(mask_img.dataobj, np.float32), mask_img.affine, shape, affine) > 0.5
    return shape, affine, template, mask


@lru_cache(maxsize=2)
def _fixed_image(voxel_mm: float) -> sitk.Image:
    shape, affine, template, _ = target_grid(voxel_mm, 8.0)
    return to_sitk(template, affine)


# ---- the steps -------------------------------------------------------------------------------------

def n4_correct(img: sitk.Image, shrink: int, iterations: tuple[int, ...]) -> sitk.Image:
    """N4 bias-field correction, fitted on a shrunk copy inside an Otsu head mask, applied at full size."""
    mask = sitk.OtsuThreshold(img, 0, 1, 200)
    small, small_mask = sitk.Shrink(img, [shrink] * 3), sitk.Shrink(mask, [shrink] * 3)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(iterations))
    n4.Execute(small, small_mask)
    log_bias = n4.GetLogBiasFieldAsImage(img)
    return sitk.Cast(img / sitk.Exp(log_bias), sitk.sitkFloat32)


def register_affine(moving: sitk.Image, p: PreprocessParams) -> sitk.Transform:
    """Affine transform template (fixed) -> subject (moving) physical points, initialised by matching
    the images' centres of mass and optimised coarse to fine (`p.pyramid`) with Mattes mutual
    information: a rigid stage over the whole pyramid, then (by default) the affine at full resolution."""
    fixed = _fixed_image(p.registration_voxel_mm)
    moving_small = _on_grid(sitk.SmoothingRecursiveGaussian(moving, p.registration_voxel_mm / 2.355), p.registration_voxel_mm)

    def run(initial: sitk.Transform, shrink: list[int]) -> sitk.Transform:
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        reg.SetMetricSamplingStrategy(reg.REGULAR if p.sampling == "regular" else reg.RANDOM)
        reg.SetMetricSamplingPercentage(p.sampling_fraction, p.seed)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=p.min_step_mm, numberOfIterations=p.registration_iterations,
                                                    relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel(shrink)
        reg.SetSmoothingSigmasPerLevel([float(f > 1) for f in shrink])
        reg.SetInitialTransform(initial, inPlace=False)
        return reg.Execute(fixed, moving_small)

    moments = sitk.CenteredTransformInitializerFilter.MOMENTS
    if p.rigid_first:
        rigid = sitk.Euler3DTransform(run(sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(), moments), list(p.pyramid)).GetNthTransform(0))
        affine = sitk.AffineTransform(3)
        affine.SetCenter(rigid.GetCenter())
        affine.SetMatrix(rigid.GetMatrix())
        affine.SetTranslation(rigid.GetTranslation())
    else:
        affine = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3), moments)
    # After a rigid stage the pose is close: the affine stage needs only the finest level.
    result = run(affine, [1] if p.rigid_first else list(p.pyramid))
    return result.GetNthTransform(0) if isinstance(result, sitk.CompositeTransform) else result


def _on_grid(img: sitk.Image, voxel_mm: float) -> sitk.Image:
    """`img` resampled onto voxels of `voxel_mm` over the same field of view. Registration builds its
    pyramid from the moving image at every level of both stages: on the 3 mm copy instead of the
    2 mm scan that halves the registration time; on the phantom the median error against the true
    affine goes from 0.65 to 0.74 mm, every subject still within one 2 mm voxel (BENCHMARKS.md)."""
    size = [max(1, int(round(n * s / voxel_mm))) for n, s in zip(img.GetSize(), img.GetSpacing())]
    return sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), [voxel_mm] * 3,
                         img.GetDirection(), 0.0, sitk.sitkFloat32)


@dataclass
class Preprocessed:
    volume: np.ndarray                 # on the target grid, z-scored inside the mask
    template_to_native: np.ndarray     # 4x4 RAS
    qc_correlation: float
    seconds: dict = field(default_factory=dict)
    attempt: int = 0                   # which registration attempt was kept (0: the configured one)


def preprocess_image(img: nib.Nifti1Image, p: PreprocessParams) -> Preprocessed:
    """Run every step on one image; return the volume on the template grid and the recovered affine.

    ITK runs single-threaded here: its metric sums depend on the thread count, so this is what makes
    the same image and params give the same numbers on every machine. Parallelism is over subjects."""
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        return _preprocess_image(img, p)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _preprocess_image(img: nib.Nifti1Image, p: PreprocessParams) -> Preprocessed:
    seconds = {}
    t = time.perf_counter()
    ras = nib.as_closest_canonical(img)
    data = np.asarray(ras.dataobj, dtype=np.float32)
    data = data.reshape(data.shape[:3])  # a 4D file of one frame (ingest keeps it): ITK would read (x, y, z, 1) as vectors
    if not (data > 0).any():
        raise EndophenoError("no voxel above 0: expected a magnitude image (bias correction and registration need positive intensities)")
    moving = to_sitk(data, ras.affine)
    moving = sitk.Cast(sitk.Threshold(moving, 0.0, 1e30, 0.0), sitk.sitkFloat32)  # N4 works on positive values
    seconds["reorient"] = time.perf_counter() - t
    t = time.perf_counter()
    corrected = n4_correct(moving, p.n4_shrink, p.n4_iterations)
    seconds["n4"] = time.perf_counter() - t
    best = None
    for attempt, q in enumerate(_registration_attempts(p)):
        t = time.perf_counter()
        tx = register_affine(corrected, q)
        seconds[f"register{attempt or ''}"] = time.perf_counter() - t
        volume, corr = _to_template(corrected, tx, p)
        if best is None or corr > best.qc_correlation:
            best = Preprocessed(volume, transform_to_ras(tx), corr, seconds, attempt)
        if corr >= p.qc_min_correlation:
            break
    return best


def _registration_attempts(p: PreprocessParams) -> list[PreprocessParams]:
    """The configured registration, then fallbacks tried only when its result fails QC: optimisers
    that start elsewhere or sample differently rarely fall into the same local minimum (on the
    phantom about 1 subject in 200 needs a second attempt)."""
    return [p, replace(p, pyramid=(2, 1)), replace(p, sampling="random", sampling_fraction=0.25, seed=p.seed + 1)]


def _to_template(corrected: sitk.Image, tx: sitk.Transform, p: PreprocessParams) -> tuple[np.ndarray, float]:
    """Resample onto the template grid, mask, z-score inside the mask; and the correlation with the template."""
    shape, affine, template, mask = target_grid(p.voxel_size_mm, p.crop_margin_mm)
    out = sitk.Resample(corrected, to_sitk(np.zeros(shape, np.float32), affine), tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    volume = zscore_inside(sitk.GetArrayFromImage(out).T, mask)
    return volume, float(np.corrcoef(volume[mask], template[mask])[0, 1])


def zscore_inside(volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float32, z-scored over the voxels inside `mask`, 0 outside: intensities comparable across scanners."""
    inside = volume[mask]
    return np.where(mask, (volume - inside.mean()) / max(float(inside.std()), 1e-6), 0.0).astype(np.float32)


# ---- the store -------------------------------------------------------------------------------------

def _compressors(codec: str) -> list:
    if codec not in CODECS:
        raise EndophenoError(f"preprocess.codec '{codec}': expected one of {', '.join(CODECS)}")
    return [CODECS[codec]] if CODECS[codec] else []


def _row_label(key: ScanKey) -> str:
    return f"{key.subject_id}_ses-{key.session}" if key.session else key.subject_id


def split_row_label(label: str) -> tuple[str, str | None]:
    """(subject_id, session or None) of an MNI row label, the inverse of `_row_label` (BIDS labels are
    alphanumeric, so "_ses-" cannot occur inside one)."""
    subject, _, session = str(label).partition("_ses-")
    return subject, session or None


PER_SUBJECT = ("subject", "template_to_native", "qc_correlation", "qc_pass", "source_sha256", "note")  # and the modality's


def _create(store: Path, p: PreprocessParams) -> zarr.Group:
    """A fresh, empty `mni` group with the grid, template and mask."""
    shape, affine, template, mask = target_grid(p.voxel_size_mm, p.crop_margin_mm)
    coords = {ax: affine[i, i] * np.arange(n) + affine[i, 3] for i, (ax, n) in enumerate(zip("xyz", shape))}
    ds = xr.Dataset(
        {"template": (("x", "y", "z"), template, {"description": "MNI152 2009a template on this grid"}),
         "brain_mask": (("x", "y", "z"), mask, {"description": "template brain mask on this grid"})},
        coords={ax: (ax, c, {"units": "mm", "long_name": f"MNI {ax}"}) for ax, c in coords.items()},
        attrs={"description": "volumes in template (MNI152) space", "affine": affine.tolist(), "preprocess": p.__dict__,
               "params_digest": p.digest(), "space": "MNI152NLin2009aSym"},
    )
    ds.to_zarr(str(store), group=MNI, mode="w", zarr_format=3, consolidated=False)
    g = open_group(store, MNI)
    n = 0
    grid = tuple(shape)
    g.create_array("subject", shape=(n,), chunks=(1024,), dtype=str, dimension_names=["subject"], attributes={"description": "subject_id (with _ses-<session> when sessions exist)"})
    g.create_array(p.modality, shape=(n, *grid), chunks=(1, *grid), dtype="float32", fill_value=np.nan, dimension_names=["subject", "x", "y", "z"],
                   compressors=_compressors(p.codec),
                   attributes={"description": f"{p.modality} in template space, z-scored inside brain_mask", "units": "z"})
    g.create_array("template_to_native", shape=(n, 4, 4), chunks=(1024, 4, 4), dtype="float64", fill_value=np.nan, dimension_names=["subject", "row", "col"],
                   attributes={"description": "affine: template mm -> the subject's scanner mm (RAS), from registration"})
    g.create_array("qc_correlation", shape=(n,), chunks=(1024,), dtype="float32", fill_value=np.nan, dimension_names=["subject"],
                   attributes={"description": "Pearson correlation with the template inside brain_mask"})
    g.create_array("qc_pass", shape=(n,), chunks=(1024,), dtype="bool", fill_value=False, dimension_names=["subject"],
                   attributes={"description": f"qc_correlation >= {p.qc_min_correlation}"})
    g.create_array("source_sha256", shape=(n,), chunks=(1024,), dtype=str, dimension_names=["subject"],
                   attributes={"description": "sha256 of the native source file this row was computed from; empty until done"})
    g.create_array("note", shape=(n,), chunks=(1024,), dtype=str, dimension_names=["subject"], attributes={"description": "why a subject failed, if it did"})
    return g


def _append_rows(g: zarr.Group, n0: int, labels: list[str]) -> None:
    """Rows n0.. for `labels`: every per-subject array is resized to n0 + len(labels) (rows from n0 on
    are new; those a crashed run left unlabelled are reused), then the labels are written."""
    n1 = n0 + len(labels)
    # Every per-subject array grows together (the log-Jacobian maps of morphometry too, NaN until
    # computed): arrays of different lengths along `subject` would make the group unreadable as a Dataset.
    for _, arr in g.arrays():
        if (arr.metadata.dimension_names or [None])[0] == "subject":
            arr.resize((n1, *arr.shape[1:]))
    g["subject"][n0:n1] = np.array(labels, dtype=object)
    g["source_sha256"][n0:n1] = np.array([""] * len(labels), dtype=object)
    g["note"][n0:n1] = np.array([""] * len(labels), dtype=object)


def _preprocess_task(args) -> dict:
    store, native_path, row, modality, p = args
    arr = zarr.open_array(f"{store}/{native_path}", mode="r")
    result = preprocess_image(image_from(arr), p)
    out = zarr.open_array(f"{store}/{MNI}/{modality}", mode="r+")
    out[row] = result.volume
    return {"row": row, "sha256": arr.attrs["source"]["sha256"], "template_to_native": result.template_to_native,
            "qc_correlation": result.qc_correlation, "seconds": result.seconds,
            "note": f"registration attempt {result.attempt + 1} kept" if result.attempt else ""}


@dataclass
class PreprocessReport:
    processed: list[str] = field(default_factory=list)
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    qc_failed: list[tuple[str, float]] = field(default_factory=list)

    def summary(self) -> str:
        return (f"preprocess: {len(self.processed)} processed, {self.unchanged} unchanged, {len(self.failed)} failed, "
                f"{len(self.qc_failed)} flagged by QC")


def preprocess(store: str | Path, p: PreprocessParams = PreprocessParams(), *, workers: int | None = None, scheduler: str | None = None) -> PreprocessReport:
    """Bring `mni/<modality>` up to date with the native volumes of the store."""
    store = Path(store)
    root = open_store(store, mode="r+")
    natives = [(key, arr) for key, arr in iter_native(store) if key.modality == p.modality]
    if not natives:
        raise EndophenoError(f"{store}: no native {p.modality} volumes (run `endopheno ingest` first)")
    g = open_group(store, MNI) if MNI in root else None
    # an array missing: a crash while `_create` was building the group
    if g is None or g.attrs.get("params_digest") != p.digest() or any(name not in g for name in (p.modality, *PER_SUBJECT)):
        if g is not None:
            log.info("preprocessing parameters changed (or the group is incomplete): rebuilding %s/%s", store, MNI)
        g = _create(store, p)
    labels = list(g["subject"][:]) if g["subject"].shape[0] else []
    if "" in labels:  # rows a crash left unlabelled while they were being added: never processed, so added anew
        labels = labels[: labels.index("")]
    row_of = {label: i for i, label in enumerate(labels)}
    new = [_row_label(k) for k, _ in natives if _row_label(k) not in row_of]
    if new or g["subject"].shape[0] != len(labels):
        _append_rows(g, len(labels), new)
        row_of.update({label: len(labels) + i for i, label in enumerate(new)})
    done = list(g["source_sha256"][:]) if row_of else []
    publish(store)  # readers now see every row, processed or not

    report = PreprocessReport()
    tasks = []
    for key, arr in natives:
        row = row_of[_row_label(key)]
        if done[row] == arr.attrs["source"]["sha256"]:
            report.unchanged += 1
        else:
            tasks.append((str(store), key.path, row, p.modality, p))
    results = []

    def flush():
        for r in results:
            g["template_to_native"][r["row"]] = r["template_to_native"]
            g["qc_correlation"][r["row"]] = r["qc_correlation"]
            g["qc_pass"][r["row"]] = r["qc_correlation"] >= p.qc_min_correlation
            g["note"][r["row"]] = r.get("note", "")
            g["source_sha256"][r["row"]] = r["sha256"]  # last: marks the row done
        results.clear()

    label_of = {i: label for label, i in row_of.items()}
    for task, result in map_items(_preprocess_task, tasks, workers=workers, scheduler=scheduler, label="preprocess"):
        label = label_of[task[2]]
        if isinstance(result, Exception):
            reason = " ".join(str(result).split())  # one line: ITK's messages span several
            report.failed.append((label, reason))
            log.warning("subject %s failed: %s", label, reason)
            g["note"][task[2]] = f"failed: {reason}"
            continue
        report.processed.append(label)
        if result["qc_correlation"] < p.qc_min_correlation:
            report.qc_failed.append((label, result["qc_correlation"]))
            result["note"] = f"QC: correlation with template {result['qc_correlation']:.3f} < {p.qc_min_correlation} after every registration attempt"
            log.warning("subject %s flagged: %s", label, result["note"])
        results.append(result)
        if len(results) >= 25:
            flush()
    flush()
    publish(store)
    return report


def open_mni(store: str | Path) -> xr.Dataset:
    """The preprocessed volumes as a labelled Dataset (lazy, dask-backed)."""
    return xr.open_zarr(str(store), group=MNI)


def volume_store_digest(ds: xr.Dataset) -> str:
    """The content digest of the MNI group: preprocessing parameters and every subject's source hash
    (preprocessing is deterministic, so these fix its output). Feature sets and training runs record it."""
    return mni_digest(ds)[0]


def mni_digest(ds: xr.Dataset) -> tuple[str, dict[str, str]]:
    """`volume_store_digest` and what it is made of: subject -> source sha256 (and, where the log-Jacobian
    map is done, the source sha256 it was computed from)."""
    prefix = str(ds.attrs.get("params_digest", ""))
    items = dict(zip(ds.subject.values.tolist(), ds.source_sha256.values.tolist()))
    if "logjac" in ds:  # the log-Jacobian maps: their knobs, and which rows are done
        prefix += str(ds["logjac"].attrs.get("params_digest", ""))
        items = {s: f"{sha} logjac:{lj}" for (s, sha), lj in zip(items.items(), ds["logjac_source_sha256"].values.tolist())}
    return content_digest(items, prefix), items
