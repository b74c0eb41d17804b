"""Regions of interest of the phantom: ellipsoids at documented MNI coordinates, intersected with the
template's grey matter (or, for the ventricles, its CSF).

Centres are in MNI152 mm (RAS). Hippocampus, amygdala and entorhinal centres follow the centroids of the
Harvard-Oxford / Juelich probabilistic atlases shipped with FSL; the posterior cingulate / precuneus
centre is the default-mode-network node of Buckner et al. (2008, Ann N Y Acad Sci 1124:1-38); the
lateral ventricles' centre was measured on this template (its voxels darker than 0.45 near the midline).
These are the regions that atrophy first in Alzheimer's disease (Frisoni et al. 2010, Nat Rev Neurol
6:67-77), so the phantom's diagnosis acts on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from endopheno import mni


@dataclass(frozen=True)
class Region:
    name: str
    label: int
    centre_mm: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    tissue: str  # "gm" or "csf"
    group: str   # the key of the region's effects in params.yaml (both hemispheres share one)

    @property
    def sigma_mm(self) -> np.ndarray:
        """Width of the smooth contraction around the region (a Gaussian bump), per axis."""
        return np.asarray(self.radii_mm, dtype=np.float64)


REGIONS: tuple[Region, ...] = (
    Region("hippocampus_L", 1, (-26.0, -22.0, -14.0), (8.0, 8.0, 8.0), "gm", "hippocampus"),
    Region("hippocampus_R", 2, (28.0, -22.0, -14.0), (8.0, 8.0, 8.0), "gm", "hippocampus"),
    Region("amygdala_L", 3, (-22.0, -4.0, -18.0), (6.0, 6.0, 6.0), "gm", "amygdala"),
    Region("amygdala_R", 4, (24.0, -4.0, -18.0), (6.0, 6.0, 6.0), "gm", "amygdala"),
    Region("entorhinal_L", 5, (-24.0, -8.0, -34.0), (6.0, 6.0, 6.0), "gm", "entorhinal"),
    Region("entorhinal_R", 6, (26.0, -8.0, -34.0), (6.0, 6.0, 6.0), "gm", "entorhinal"),
    Region("precuneus_pcc", 7, (0.0, -56.0, 30.0), (10.0, 10.0, 10.0), "gm", "precuneus_pcc"),
    Region("ventricle_L", 8, (-10.5, -13.0, 15.0), (10.0, 24.0, 10.0), "csf", "ventricles"),
    Region("ventricle_R", 9, (10.5, -13.0, 15.0), (10.0, 24.0, 10.0), "csf", "ventricles"),
)
BY_NAME = {r.name: r for r in REGIONS}


def ellipsoid_distance2(points_mm: np.ndarray, region: Region) -> np.ndarray:
    """Squared normalised distance sum(((p - c) / sigma)^2) of points (3, n) from the region's centre."""
    d = (points_mm - np.asarray(region.centre_mm, dtype=points_mm.dtype)[:, None]) / region.sigma_mm.astype(points_mm.dtype)[:, None]
    return (d * d).sum(0)


@lru_cache(maxsize=1)
def label_image() -> tuple[np.ndarray, np.ndarray]:
    """Region labels (int16, 0 = none) on the 1 mm template grid, and that grid's affine."""
    t1 = mni.t1()
    t1_data = np.asarray(t1.dataobj)
    gm = np.asarray(mni.grey_matter().dataobj)
    inv = np.linalg.inv(t1.affine)
    labels = np.zeros(t1.shape, dtype=np.int16)
    for region in REGIONS:  # evaluate each ellipsoid only inside its bounding box
        c, r = np.asarray(region.centre_mm), np.asarray(region.radii_mm)
        lo = np.maximum(np.floor(inv[:3, :3] @ (c - r) + inv[:3, 3]).astype(int), 0)
        hi = np.minimum(np.ceil(inv[:3, :3] @ (c + r) + inv[:3, 3]).astype(int) + 1, t1.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        box_affine = t1.affine.copy()
        box_affine[:3, 3] = t1.affine[:3, :3] @ lo + t1.affine[:3, 3]
        shape = tuple(hi - lo)
        inside = (ellipsoid_distance2(mni.voxel_centres(shape, box_affine), region) <= 1.0).reshape(shape)
        tissue = (gm[box] > 0.5) if region.tissue == "gm" else ((t1_data[box] > 0) & (t1_data[box] < 0.45))
        labels[box][inside & tissue & (labels[box] == 0)] = region.label
    return labels, t1.affine


def contraction_gain(region: Region) -> float:
    """Relative volume lost by the region per unit contraction strength `a` (first order).

    The phantom contracts a region by the pull-back map psi(y) = y + a (y - c) g(y), with g a Gaussian
    bump of widths sigma; its Jacobian determinant is 1 + a g (3 - sum(((y - c) / sigma)^2)) to first
    order in `a`, so the region's volume changes by -a * mean_R[g (3 - d2)]. Inverting this is how a
    target volume change becomes a contraction strength.
    """
    labels, affine = label_image()
    ijk = np.argwhere(labels == region.label).T
    pts = affine[:3, :3] @ ijk + affine[:3, 3:4]
    d2 = ellipsoid_distance2(pts, region)
    return float(np.mean(np.exp(-0.5 * d2) * (3.0 - d2)))
