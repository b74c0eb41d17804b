"""How a phantom subject is scanned: a head pose, a voxel grid in one of the orientations scanners
write, a smooth bias field, Rician noise whose level depends on the site, and a storage type.

The subject's image is rendered by pulling every scanner voxel back through pose and anatomy into the
(PSF-blurred) template: one interpolation per voxel, no resampling chain.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

from endopheno import mni
from endopheno.phantom.anatomy import Anatomy, brain_centre

AXIS = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
WM_INTENSITY = 0.88  # the template's white-matter level; noise is a fraction of it


@dataclass
class Acquisition:
    site: str
    orientation: str               # nibabel axis codes of the array axes, e.g. "LPS"
    voxel_size: tuple[float, float, float]  # per array axis, mm
    shape: tuple[int, int, int]
    affine: np.ndarray             # voxel -> scanner mm (RAS), as written in the NIfTI header
    pose: np.ndarray               # subject anatomy mm -> scanner mm (rigid)
    noise_sd: float                # Rician sigma as a fraction of white-matter intensity
    bias_coef: np.ndarray          # coefficients of the quadratic log bias field
    gain: float                    # scanner intensity units per template unit
    dtype: str                     # "int16" (with scl_slope) or "float32"

    def true_transform(self, head_scale: float) -> np.ndarray:
        """The affine part of template mm -> scanner mm: head scaling about the brain centre, then pose.
        This is what affine registration to the template must recover."""
        c = brain_centre()
        scale = np.eye(4)
        scale[:3, :3] *= head_scale
        scale[:3, 3] = c - head_scale * c
        return self.pose @ scale


def grid_affine(orientation: str, voxel_size, fov_mm, centre_mm) -> tuple[tuple[int, int, int], np.ndarray]:
    """Voxel grid of a scan written in `orientation` (axis codes, array axis order), covering `fov_mm`
    (per world axis x, y, z) around `centre_mm`."""
    affine = np.eye(4)
    shape = []
    for i, code in enumerate(orientation):
        world_axis, sign = AXIS[code]
        affine[:3, i] = 0.0
        affine[world_axis, i] = sign * voxel_size[i]
        shape.append(int(round(fov_mm[world_axis] / voxel_size[i])))
    affine[:3, 3] = np.asarray(centre_mm) - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return tuple(shape), affine


def random_pose(rng: np.random.Generator, max_rotation_deg: float, max_translation_mm: float) -> np.ndarray:
    """A rigid transform anatomy -> scanner: rotation about the brain centre, then translation."""
    c = brain_centre()
    rot = Rotation.from_euler("xyz", rng.uniform(-max_rotation_deg, max_rotation_deg, 3), degrees=True).as_matrix()
    pose = np.eye(4)
    pose[:3, :3] = rot
    pose[:3, 3] = c - rot @ c + rng.uniform(-max_translation_mm, max_translation_mm, 3)
    return pose


def _quadratic_terms(u: np.ndarray) -> np.ndarray:
    x, y, z = u
    return np.stack([x, y, z, x * x, y * y, z * z, x * y, x * z, y * z])


def render(anatomy: Anatomy, acq: Acquisition, template: np.ndarray, rng: np.random.Generator) -> nib.Nifti1Image:
    """The subject's T1w image as the scanner writes it."""
    ijk = np.indices(acq.shape, dtype=np.float32).reshape(3, -1)
    scanner = acq.affine[:3, :3].astype(np.float32) @ ijk + acq.affine[:3, 3:4].astype(np.float32)
    inv_pose = np.linalg.inv(acq.pose)
    subject = inv_pose[:3, :3].astype(np.float32) @ scanner + inv_pose[:3, 3:4].astype(np.float32)
    # Only points that can land in the brain are pulled back: the template is zero elsewhere.
    lo, hi = anatomy.brain_box()
    near = np.flatnonzero(np.all((subject > lo[:, None].astype(np.float32)) & (subject < hi[:, None].astype(np.float32)), axis=0))
    vox = mni.world_to_voxel(mni.t1().affine, anatomy.pullback(subject[:, near])).astype(np.float32)
    signal = np.zeros(subject.shape[1], dtype=np.float32)
    signal[near] = ndi.map_coordinates(template, vox, order=1, cval=0.0, prefilter=False)
    centre = brain_centre().astype(np.float32)[:, None]
    log_bias = acq.bias_coef.astype(np.float32) @ _quadratic_terms((scanner - centre) / 100.0)
    signal *= np.exp(log_bias)
    sigma = acq.noise_sd * WM_INTENSITY
    real = signal + rng.normal(0.0, sigma, signal.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, signal.shape).astype(np.float32)
    data = (np.sqrt(real * real + imag * imag) * acq.gain).reshape(acq.shape)
    img = nib.Nifti1Image(data.astype(np.float32), acq.affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_sform(acq.affine, code=1)
    img.header.set_qform(acq.affine, code=1)
    img.header["descrip"] = b"endopheno phantom"
    img.set_data_dtype(np.dtype(acq.dtype))  # int16: nibabel picks scl_slope/scl_inter on save
    return img


def random_bias(rng: np.random.Generator, strength: float) -> np.ndarray:
    """Coefficients of a smooth quadratic log bias field whose largest excursion over a 100 mm radius
    is about `strength` (0.2 means intensities vary by about +-20%)."""
    coef = rng.standard_normal(9)
    probe = rng.uniform(-1, 1, (3, 2000))
    probe = probe[:, (probe**2).sum(0) <= 1]
    return coef * strength / np.abs(coef @ _quadratic_terms(probe)).max()
