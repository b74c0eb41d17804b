"""Attribution maps as NIfTI images in MNI space, and group averages of subjects' maps."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from endopheno.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["group_average", "write_map"]


def write_map(path: str | Path, volume, affine) -> Path:
    """Write a ``[X, Y, Z]`` map as a float32 NIfTI-1 image whose voxel → MNI mm transform is `affine`
    (a `VolumeModel`'s ``affine``: the store's, scaled to the model's grid), as both sform and qform with
    the MNI code, units mm. Atomic: written beside `path` and renamed, so a crash leaves no partial file.
    The suffix (``.nii`` or ``.nii.gz``) chooses compression."""
    path = Path(path)
    volume = np.asarray(volume, dtype=np.float32)
    affine = np.asarray(affine, dtype=np.float64)
    if volume.ndim != 3 or affine.shape != (4, 4):
        raise InputError(path, f"needs a [X, Y, Z] map and a 4x4 affine, got {volume.shape} and {affine.shape}")
    if not path.name.endswith((".nii", ".nii.gz")):
        raise InputError(path, "a NIfTI map's name must end in .nii or .nii.gz")
    image = nib.Nifti1Image(volume, affine)
    image.set_sform(affine, code="mni")
    image.set_qform(affine, code="mni")
    image.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".partial-{os.getpid()}-{path.name}")
    try:
        nib.save(image, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    log.debug("wrote %s", path)
    return path


def group_average(maps, members=None) -> np.ndarray:
    """The mean map over subjects (axis 0 of `maps`, ``[N, ...]``), over all of them or over the subset
    `members` (a boolean selection of length N, e.g. ``diagnosis == "AD"`` or ``correct``, or indices)."""
    maps = np.asarray(maps, dtype=np.float64)
    chosen = maps if members is None else maps[np.asarray(members)]
    if len(chosen) == 0:
        raise InputError("group_average", "the group has no subjects")
    return chosen.mean(axis=0)
