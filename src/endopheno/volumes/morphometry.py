"""Tensor-based morphometry: per subject, the log-Jacobian map of a non-linear registration to the template.

After the affine step of preprocessing, what differs between a subject's anatomy and the template is
local: a hippocampus 20% smaller than its neighbours predict, ventricles 40% larger. The intensities
on the template grid show such changes only as a shift of tissue boundaries by a fraction of a voxel,
and a region's mean intensity measures its volume poorly (on the phantom: AD vs CN from the mean T1
of each true region, BA 0.80; from the true volumes, 0.95). The deformation that carries the template
onto the subject measures it directly: its Jacobian determinant J is the local ratio of the subject's
volume to the template's, and the mean of log J over a region is the region's log relative volume.
This is tensor-based morphometry (TBM; Ashburner & Friston 2003, in Human Brain Function; Hua et al.
2008, NeuroImage 43:458), the map behind the ADNI voxelwise GWAS of Stein et al. 2010 (NeuroImage
51:542).

The deformation: SimpleITK's symmetric-forces demons (Thirion 1998, Med Image Anal 2:243; Vercauteren
et al. 2008) between the subject's affine-registered, z-scored MNI volume and the template, both
average-pooled to each grid of ``levels_mm`` in turn (coarse to fine, each level starting from the
last one's field), the displacement field smoothed by a Gaussian of ``smoothing_voxels`` after every
iteration. Assumes the intensities of both images correspond after z-scoring inside the
brain mask (a mono-modal T1 to T1 template match; demons' force is the intensity difference). The
field is interpolated back onto the store's grid and ``log J`` (``J`` clipped at 1e-3 where folding
would make it non-positive) is stored inside the brain mask, 0 outside.

On the phantom (80 subjects; the default 4 then 2 mm, 30 + 10 iterations, smoothing 1 voxel; about 1.6 s
per subject and core): the mean log J inside each true region correlates 0.79–0.94 with the true region
volume relative to head size (0.55 for the left entorhinal cortex), and AD vs CN from the nine region
means reaches BA 0.89 (logistic regression, 5-fold CV; the true volumes 0.93).

Store: ``mni/logjac`` (subject, x, y, z) float32, NaN until computed, beside ``mni/<modality>``, so
models read it as one more input map; ``mni/logjac_source_sha256`` marks a row done (the
``source_sha256`` of the volume it came from, written last). Changing the knobs recomputes every
row; the registration of preprocessing is never redone for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import zarr

from endopheno.errors import EndophenoError
from endopheno.parallel import map_items
from endopheno.volumes.preprocess import zscore_inside
from endopheno.volumes.store import MNI, open_group, publish

log = logging.getLogger(__name__)
MAP = "logjac"
DONE = "logjac_source_sha256"


@dataclass(frozen=True)
class MorphometryParams:
    """``preprocess.morphometry`` of params.yaml (null there: no log-Jacobian maps)."""

    modality: str = "T1w"               # the MNI volume registered to the template
    levels_mm: tuple[float, ...] = (4.0, 2.0)   # coarse to fine grids of the demons registration (whole multiples of the store's voxel)
    iterations: tuple[int, ...] = (30, 10)      # per level: region means within 0.01 of (100, 20)'s correlation with the truth (BENCHMARKS.md)
    smoothing_voxels: float = 1.0       # SD of the Gaussian regularising the displacement field, in voxels of each level

    def __post_init__(self):
        object.__setattr__(self, "levels_mm", tuple(float(v) for v in _sequence(self.levels_mm)))
        object.__setattr__(self, "iterations", tuple(int(v) for v in _sequence(self.iterations)))
        if len(self.levels_mm) != len(self.iterations) or not self.levels_mm:
            raise EndophenoError(f"preprocess.morphometry: levels_mm {list(self.levels_mm)} and iterations "
                                 f"{list(self.iterations)} need one entry per level")

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def _sequence(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _image(volume: np.ndarray, voxel_mm: float) -> sitk.Image:
    """An ITK image of a store volume: the grid's axes and spacing (the origin cancels out of log J)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(volume.T, dtype=np.float32))
    img.SetSpacing([voxel_mm] * 3)
    return img


def log_jacobian(volume: np.ndarray, template: np.ndarray, mask: np.ndarray, store_voxel_mm: float,
                 p: MorphometryParams = MorphometryParams()) -> np.ndarray:
    """log J of the demons deformation carrying `template` onto `volume` (both on the store's grid), on
    that grid: > 0 where the subject's tissue is larger than the template's, 0 outside `mask`."""
    for voxel_mm in p.levels_mm:
        shrink = voxel_mm / store_voxel_mm
        if shrink < 1 or abs(shrink - round(shrink)) > 1e-6:
            raise EndophenoError(f"preprocess.morphometry.levels_mm {voxel_mm:g}: must be a whole multiple of the "
                                 f"store's {store_voxel_mm:g} mm")
    fixed_full = _image(zscore_inside(template, mask), store_voxel_mm)
    moving_full = _image(zscore_inside(volume, mask), store_voxel_mm)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetStandardDeviations(p.smoothing_voxels)
    field = None
    for voxel_mm, iterations in zip(p.levels_mm, p.iterations):
        factor = [int(round(voxel_mm / store_voxel_mm))] * 3
        fixed, moving = sitk.BinShrink(fixed_full, factor), sitk.BinShrink(moving_full, factor)
        demons.SetNumberOfIterations(iterations)
        if field is None:
            field = demons.Execute(fixed, moving)
        else:  # the coarser level's field, interpolated onto this grid, is where this one starts
            field = demons.Execute(fixed, moving, _onto(field, fixed))
    # back onto the store's grid (physical coordinates: BinShrink keeps them), then the Jacobian there
    field = _onto(field, fixed_full)
    jacobian = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field)).T
    return np.where(mask, np.log(np.clip(jacobian, 1e-3, None)), 0.0).astype(np.float32)


def _onto(field: sitk.Image, grid: sitk.Image) -> sitk.Image:
    return sitk.Resample(field, grid, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())


def _task(row: int, *, store: str, p: MorphometryParams, template: np.ndarray, mask: np.ndarray, voxel_mm: float) -> int:
    # single-threaded ITK, as in preprocessing: the same numbers on every machine; parallel over subjects
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    g = zarr.open_group(store, path=MNI, mode="r+")
    volume = np.asarray(g[p.modality][row], dtype=np.float32)
    g[MAP][row] = log_jacobian(volume, template, mask, voxel_mm, p)
    return row


def _arrays(g: zarr.Group, p: MorphometryParams, n: int, grid: tuple[int, int, int]) -> None:
    """Create the map and its done-marker (preprocessing grows them with every new subject, as all
    per-subject arrays); new knobs reset every row."""
    stale = MAP in g and g[MAP].attrs.get("params_digest") != p.digest()
    if stale:
        log.info("morphometry parameters changed: every log-Jacobian map is recomputed")
    if stale or (MAP in g) != (DONE in g):  # one without the other: a crash between creating (or deleting) the two
        for name in (MAP, DONE):
            if name in g:
                del g[name]
    if MAP not in g:
        # stored as the volumes are (preprocess.codec): models read both maps, and zarr's default (zstd)
        # made the cnn3d loader 2.5x slower on log J than on T1 (BENCHMARKS.md)
        g.create_array(MAP, shape=(n, *grid), chunks=(1, *grid), dtype="float32", fill_value=np.nan,
                       compressors=g[p.modality].compressors, dimension_names=["subject", "x", "y", "z"],
                       attributes={"description": f"log Jacobian determinant of the demons deformation carrying the template "
                                                  f"onto the subject's {p.modality} (> 0: larger than the template)",
                                   "units": "log ratio", "params": asdict(p), "params_digest": p.digest()})
        g.create_array(DONE, shape=(n,), chunks=(1024,), dtype=str, dimension_names=["subject"],
                       attributes={"description": "source_sha256 of the volume the logjac row was computed from; empty until done"})
        g[DONE][:] = np.array([""] * n, dtype=object)


def morphometry(store: str | Path, p: MorphometryParams = MorphometryParams(), *, workers: int | None = None,
                scheduler: str | None = None) -> list[int]:
    """Bring ``mni/logjac`` up to date with the preprocessed volumes; returns the rows computed."""
    g = open_group(store, MNI)
    if p.modality not in g:
        raise EndophenoError(f"{store}: no preprocessed {p.modality} volumes (run `endopheno preprocess` first)")
    n, grid = g[p.modality].shape[0], tuple(g[p.modality].shape[1:])
    _arrays(g, p, n, grid)
    sources = g["source_sha256"][:].tolist() if n else []
    done = g[DONE][:].tolist() if n else []
    rows = [i for i in range(n) if sources[i] and done[i] != sources[i]]
    publish(store)
    if not rows:
        return []
    shared = {"store": str(store), "p": p, "template": np.asarray(g["template"][:], dtype=np.float32),
              "mask": np.asarray(g["brain_mask"][:], dtype=bool), "voxel_mm": float(abs(np.asarray(g.attrs["affine"])[0][0]))}
    computed = []
    for row, result in map_items(_task, rows, workers=workers, scheduler=scheduler, label="morphometry", shared=shared):
        if isinstance(result, Exception):
            log.warning("subject %s: no log-Jacobian map: %s", g["subject"][row], result)
            continue
        g[DONE][row] = sources[row]  # last: marks the row done
        computed.append(row)
    publish(store)
    return computed
