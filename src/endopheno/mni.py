"""The MNI152 template (ICBM 2009a nonlinear symmetric, 1 mm) and its tissue maps, as shipped inside
nilearn: nothing is downloaded. The template is skull-stripped, so the phantom cohort is too.

Both the phantom (which deforms it into subjects) and preprocessing (which registers subjects back to
it) use this module, so they agree on one template and one world frame (RAS mm).
"""

from __future__ import annotations

from functools import lru_cache

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi


@lru_cache(maxsize=None)
def _load(kind: str) -> nib.Nifti1Image:
    from nilearn import datasets

    loader = {
        "t1": datasets.load_mni152_template,
        "gm": datasets.load_mni152_gm_template,
        "brain_mask": datasets.load_mni152_brain_mask,
    }[kind]
    img = loader(resolution=1)
    return nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)


def t1() -> nib.Nifti1Image:
    """T1 template, intensities in [0, 1], zero outside the brain."""
    return _load("t1")


def grey_matter() -> nib.Nifti1Image:
    """Grey-matter probability map on the template grid."""
    return _load("gm")


def brain_mask() -> nib.Nifti1Image:
    """Binary brain mask on the template grid."""
    return _load("brain_mask")


@lru_cache(maxsize=1)
def brain_bounds() -> tuple[np.ndarray, np.ndarray]:
    """The brain mask's bounding box (lo, hi), in mm: the centres of its extreme voxels."""
    m = brain_mask()
    ijk = np.argwhere(np.asarray(m.dataobj) > 0)
    return m.affine[:3, :3] @ ijk.min(0) + m.affine[:3, 3], m.affine[:3, :3] @ ijk.max(0) + m.affine[:3, 3]


def world_to_voxel(affine: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    """Map points (3, n) in world mm to (fractional) voxel indices (3, n) of an image with `affine`."""
    inv = np.linalg.inv(affine)
    return inv[:3, :3] @ points_mm + inv[:3, 3:4]


def voxel_centres(shape: tuple[int, int, int], affine: np.ndarray, dtype=np.float32) -> np.ndarray:
    """World coordinates (3, nx*ny*nz) of every voxel centre of a grid, C order."""
    ijk = np.indices(shape, dtype=dtype).reshape(3, -1)
    return (affine[:3, :3].astype(dtype) @ ijk + affine[:3, 3:4].astype(dtype)).astype(dtype)


def smooth_to(img: nib.Nifti1Image, fwhm_mm: float) -> np.ndarray:
    """The image's data blurred by a Gaussian of `fwhm_mm` (minus its own voxel size), so that sampling
    it on a grid of `fwhm_mm` voxels does not alias: a simple model of a scanner's point spread."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    vox = np.sqrt((img.affine[:3, :3] ** 2).sum(0))
    sigma = np.sqrt(np.maximum(fwhm_mm**2 - vox**2, 0.0)) / (2 * np.sqrt(2 * np.log(2))) / vox
    return ndi.gaussian_filter(data, sigma) if np.any(sigma > 0) else data


def template_grid(voxel_size_mm: float, crop_margin_mm: float | None = 6.0) -> tuple[tuple[int, int, int], np.ndarray]:
    """A RAS grid at `voxel_size_mm` over the template: cropped to the brain mask's bounding box plus
    `crop_margin_mm` (or the template's whole field of view when None). Returns (shape, affine)."""
    if crop_margin_mm is None:
        ref = brain_mask()
        lo = ref.affine[:3, 3]
        hi = lo + (np.array(ref.shape) - 1) * np.diag(ref.affine)[:3]
    else:
        lo, hi = brain_bounds()
        lo, hi = lo - crop_margin_mm, hi + crop_margin_mm
    # Anchor the grid on whole multiples of the voxel size so grids of one size always line up.
    lo = np.floor(lo / voxel_size_mm) * voxel_size_mm
    shape = tuple(int(n) for n in np.floor((hi - lo) / voxel_size_mm).astype(int) + 1)
    affine = np.diag([voxel_size_mm] * 3 + [1.0])
    affine[:3, 3] = lo
    return shape, affine


def resample(data: np.ndarray, affine: np.ndarray, shape, target_affine: np.ndarray, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Sample `data` (on `affine`) at the voxel centres of the target grid."""
    pts = world_to_voxel(affine, voxel_centres(shape, target_affine, np.float64))
    return ndi.map_coordinates(data, pts, order=order, cval=cval, prefilter=order > 1).reshape(shape).astype(np.float32)
