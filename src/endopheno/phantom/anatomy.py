"""A phantom subject's anatomy: the MNI template deformed by a smooth random warp (normal anatomical
variation), a head size, a global (age) atrophy and local contractions or expansions of the regions of
`regions.REGIONS`.

Everything is a *pull-back* map psi from the subject's anatomical space (mm, MNI-aligned, before any
scanner pose) to template space: the subject's image at point y is the template's at psi(y). Defining
the map this way round needs no inversion, and a region's true volume is measured exactly as
|{y : psi(y) in region}| by sampling the region's mask through psi on a 1 mm grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi

from endopheno import mni
from endopheno.phantom.regions import REGIONS, ellipsoid_distance2, label_image

COARSE_MM = 4.0  # spacing of the grid that carries the smooth fields (warp, global atrophy)


@lru_cache(maxsize=1)
def brain_centre() -> np.ndarray:
    """Centroid of the template's brain mask (mm): the centre of head scaling, atrophy and pose."""
    m = mni.brain_mask()
    ijk = np.argwhere(np.asarray(m.dataobj) > 0).mean(0)
    return m.affine[:3, :3] @ ijk + m.affine[:3, 3]


@lru_cache(maxsize=1)
def coarse_grid() -> tuple[tuple[int, int, int], np.ndarray, np.ndarray, np.ndarray]:
    """The coarse grid (shape, affine), a smooth brain weight on it, and its points inside the brain."""
    shape, affine = mni.template_grid(COARSE_MM, crop_margin_mm=24.0)
    m = mni.brain_mask()
    weight = mni.resample(ndi.gaussian_filter(np.asarray(m.dataobj, np.float32), 6.0), m.affine, shape, affine)
    pts = mni.voxel_centres(shape, affine, np.float64)
    return shape, affine, weight, pts[:, weight.ravel() > 0.5]


def random_warp(rng: np.random.Generator, sd_mm: float, smoothness_mm: float) -> np.ndarray:
    """A smooth random displacement field (3, *coarse shape) in mm: Gaussian-filtered white noise scaled
    to `sd_mm` per component inside the brain, with its affine part removed so that the warp is purely
    nonlinear and the subject's true pose and size stay exactly the planted ones."""
    shape, affine, weight, brain_pts = coarse_grid()
    noise = rng.standard_normal((3, *shape)).astype(np.float32)
    field = np.stack([ndi.gaussian_filter(c, smoothness_mm / COARSE_MM) for c in noise])
    inside = weight.ravel() > 0.5
    flat = field.reshape(3, -1)
    design = np.vstack([brain_pts, np.ones(brain_pts.shape[1])]).T
    coef, *_ = np.linalg.lstsq(design, flat[:, inside].T, rcond=None)
    all_pts = mni.voxel_centres(shape, affine, np.float64)
    flat -= (np.vstack([all_pts, np.ones(all_pts.shape[1])]).T @ coef).T.astype(np.float32)
    flat *= sd_mm / max(float(flat[:, inside].std()), 1e-6)
    return flat.reshape(3, *shape)


@dataclass
class Anatomy:
    """One subject's anatomy. `contraction` maps region name -> strength a of psi = y + a (y - c) g(y)
    (positive shrinks the region, negative expands it); `global_contraction` is the same for the whole
    brain (an age-driven atrophy inside a fixed skull); `head_scale` a linear scale about the brain centre."""

    head_scale: float
    global_contraction: float
    contraction: dict[str, float]
    warp: np.ndarray = field(repr=False)  # (3, *coarse shape) mm
    _smooth: np.ndarray | None = field(default=None, repr=False)

    def smooth_field(self) -> np.ndarray:
        """Warp plus global atrophy, (3, *coarse shape) mm: the displacement that varies slowly."""
        if self._smooth is None:
            shape, affine, weight, _ = coarse_grid()
            pts = mni.voxel_centres(shape, affine).reshape(3, *shape)
            centre = brain_centre().astype(np.float32).reshape(3, 1, 1, 1)
            self._smooth = (self.warp + self.global_contraction * weight * (pts - centre)).astype(np.float32)
        return self._smooth

    def pullback(self, points_mm: np.ndarray) -> np.ndarray:
        """Template coordinates (3, n) of subject-anatomy points (3, n), both in mm."""
        shape, affine, _, _ = coarse_grid()
        centre = brain_centre().astype(points_mm.dtype)[:, None]
        y = centre + (points_mm - centre) / self.head_scale
        vox = mni.world_to_voxel(affine, y).astype(np.float32)
        disp = np.empty_like(y)
        smooth = self.smooth_field()
        for k in range(3):
            disp[k] = ndi.map_coordinates(smooth[k], vox, order=1, prefilter=False)
        # Which regions' bumps reach each point, looked up by the point's coarse cell rather than tested
        # against every region's box: one gather instead of nine passes over all points.
        cell = np.ravel_multi_index(tuple(np.clip(np.rint(vox).astype(np.int32), 0, np.array(shape)[:, None] - 1)), shape)
        reach = bump_reach()[cell]
        for bit, region in enumerate(REGIONS):
            a = self.contraction.get(region.name, 0.0)
            idx = np.flatnonzero(reach & (1 << bit)) if a else ()
            if len(idx) == 0:
                continue
            c = np.asarray(region.centre_mm, dtype=y.dtype)[:, None]
            yy = y[:, idx]
            disp[:, idx] += (a * np.exp(-0.5 * ellipsoid_distance2(yy, region))) * (yy - c)
        return y + disp

    def region_volumes(self, spacing_mm: float = 1.0) -> dict[str, float]:
        """True volume (mm^3) of every region in this subject: the measure of {y : psi(y) in region}."""
        centre = brain_centre()
        volumes = {}
        for region, crop, crop_affine, near, box_lo, box_hi in region_crops():
            # The subject-space box that maps onto the region's box (with room for the deformation);
            # only its points whose undeformed position is within 5 mm of the region are pulled back.
            lo = centre + (box_lo - centre) * self.head_scale
            hi = centre + (box_hi - centre) * self.head_scale
            axes = [np.arange(a, b, spacing_mm, dtype=np.float32) for a, b in zip(lo, hi)]
            grid = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
            undeformed = centre[:, None] + (grid - centre[:, None]) / self.head_scale
            ijk = np.rint(mni.world_to_voxel(crop_affine, undeformed)).astype(np.int32)
            inside_crop = np.all((ijk >= 0) & (ijk < np.array(crop.shape)[:, None]), axis=0)
            keep = np.flatnonzero(inside_crop)
            keep = keep[near[tuple(ijk[:, keep])]]
            x = self.pullback(grid[:, keep])
            inside = ndi.map_coordinates(crop, mni.world_to_voxel(crop_affine, x), order=1, cval=0.0, prefilter=False)
            volumes[region.name] = float(inside.sum() * spacing_mm**3)
        return volumes

    def brain_box(self, margin_mm: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
        """Bounding box (lo, hi) in subject mm outside which this subject has no brain."""
        lo, hi = mni.brain_bounds()
        centre = brain_centre()
        return centre + (lo - margin_mm - centre) * self.head_scale, centre + (hi + margin_mm - centre) * self.head_scale


@lru_cache(maxsize=1)
def bump_reach() -> np.ndarray:
    """Per coarse cell (flat index), a bit mask of the regions whose bump (3.5 sigma) reaches it."""
    shape, affine, _, _ = coarse_grid()
    pts = mni.voxel_centres(shape, affine, np.float64)
    bits = np.zeros(pts.shape[1], dtype=np.int32)
    for bit, region in enumerate(REGIONS):
        reach = 3.5 * region.sigma_mm + COARSE_MM  # a cell's points lie within one cell of its centre
        near = np.all(np.abs(pts - np.asarray(region.centre_mm)[:, None]) < reach[:, None], axis=0)
        bits[near] |= 1 << bit
    return bits


@lru_cache(maxsize=1)
def region_crops() -> list[tuple]:
    """Per region: its mask cropped to its bounding box plus 8 mm (float, for partial-volume sampling),
    the crop's affine, the voxels within 6 mm of the region, and the crop's box in template mm."""
    labels, affine = label_image()
    crops = []
    for region in REGIONS:
        mask = labels == region.label
        ijk = np.argwhere(mask)
        lo, hi = np.maximum(ijk.min(0) - 8, 0), np.minimum(ijk.max(0) + 9, labels.shape)
        crop = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.float32)
        crop_affine = affine.copy()
        crop_affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
        box_lo = affine[:3, :3] @ lo + affine[:3, 3]
        box_hi = affine[:3, :3] @ hi + affine[:3, 3]
        # Tissue moves by at most ~5 mm here (warp, contraction, global atrophy): a subject point whose
        # undeformed position lies farther than 6 mm (L-infinity) from the region cannot land in it.
        near = ndi.binary_dilation(crop > 0, structure=np.ones((3, 3, 3), bool), iterations=6)
        crops.append((region, crop, crop_affine, near, box_lo, box_hi))
    return crops


def atrophy_map(contraction: dict[str, float]) -> np.ndarray:
    """Voxelwise fraction of local volume lost, 1 - 1/det(J psi), on the 1 mm template grid, for the
    region contractions given (e.g. those of AD at severity 1). Negative where tissue expands
    (the ventricles). Uses the exact determinant of one bump, det = (1 + a g)^2 (1 + a g (1 - d2)),
    multiplied over regions (their bumps barely overlap)."""
    labels, affine = label_image()
    log_det = np.zeros(labels.shape, dtype=np.float64)
    for region in REGIONS:
        a = contraction.get(region.name, 0.0)
        if a == 0.0:
            continue
        c = np.asarray(region.centre_mm)
        reach = 3.5 * region.sigma_mm
        inv = np.linalg.inv(affine)
        lo = np.maximum(np.floor(inv[:3, :3] @ (c - reach) + inv[:3, 3]).astype(int), 0)
        hi = np.minimum(np.ceil(inv[:3, :3] @ (c + reach) + inv[:3, 3]).astype(int) + 1, labels.shape)
        sub = tuple(slice(a_, b_) for a_, b_ in zip(lo, hi))
        shape = tuple(hi - lo)
        sub_affine = affine.copy()
        sub_affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
        d2 = ellipsoid_distance2(mni.voxel_centres(shape, sub_affine, np.float64), region).reshape(shape)
        ag = a * np.exp(-0.5 * d2)
        log_det[sub] += 2 * np.log1p(ag) + np.log(np.maximum(1 + ag * (1 - d2), 1e-6))
    brain = np.asarray(mni.brain_mask().dataobj) > 0
    return np.where(brain, 1.0 - np.exp(-log_det), 0.0).astype(np.float32)
