"""What each latent dimension of an autoencoder means in the brain: the latent-to-region map.

An autoencoder's latent dimensions are endophenotypes without names. Each is given one by perturbation
and decoding: starting from the cohort's mean code z̄, dimension d is set to z̄_d ± k·SD_d (the cohort's
SD of that dimension; default k = 2), both codes are decoded, and the voxelwise absolute difference of
the two reconstructions, |dec(z̄ + k·SD_d·e_d) − dec(z̄ − k·SD_d·e_d)| (summed over input channels, in
the network's normalised units), is the map of what the dimension changes. Inside the brain mask, that
change is summarised per region of a label image as the region's share of the dimension's total change;
brain voxels in no region form the region ``background``, so the shares of a dimension add up to 1.
This is the perturbation analysis of the UDIP autoencoder's latent dimensions (Patel et al. 2024,
Commun. Biol. 7:414), which read each dimension's decoded change against brain regions.

Assumptions: the decoder is evaluated in eval mode (BatchNorm running statistics); the change is read
around the mean code only (a non-linear decoder may change elsewhere in latent space differently); a
region's share grows with its size, so ``enrichment`` (share ÷ the region's share of brain voxels) is
given beside it: above 1, the dimension changes the region more than an even spread would.

A GWAS hit on ``ae_t1.f017`` is read through ``top_regions``: "f017 mostly changes hippocampus_L".
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from endopheno.errors import InputError
from endopheno.featurestore.atlas import Atlas
from endopheno.models.volume_model import VolumeModel

log = logging.getLogger(__name__)

BACKGROUND = "background"
COLUMNS = ("dimension", "region", "share", "rank", "voxels", "enrichment")

__all__ = ["BACKGROUND", "COLUMNS", "dimension_names", "latent_change", "latent_regions",
           "region_shares", "top_regions"]


def dimension_names(n: int, template: str = "f{dimension}") -> list[str]:
    """The feature-set column names of `n` latent dimensions: ``f000`` … (the ``per: dimension`` column of
    features/ae_t1.yaml, its dimension numbered ``{d:03d}`` as `endopheno.models.extract.to_table` does)."""
    return [template.format(dimension=f"{d:03d}") for d in range(n)]


def _decoder(model: VolumeModel):
    decode = getattr(model.net, "decode", None)
    if decode is None:
        raise InputError(getattr(model.net, "name", model.architecture),
                         "has no decoder: latent-to-region maps need an autoencoder")
    return decode


@torch.no_grad()
def latent_change(model: VolumeModel, latents, k: float = 2.0, *, batch_size: int = 16) -> np.ndarray:
    """Voxelwise absolute change ``[D, X, Y, Z]`` (float32, 0 outside the brain mask) of the decoded volume
    when each latent dimension moves from z̄ − k·SD to z̄ + k·SD, the others held at the cohort mean z̄.

    Parameters
    ----------
    model : a registered autoencoder (`VolumeModel` whose network has ``decode``).
    latents : ``[N, D]``, the cohort's codes (``model.embed`` of every subject).
    k : the perturbation, in the cohort's SDs of each dimension.
    """
    decode = _decoder(model)
    z = np.asarray(latents, dtype=np.float64)
    if z.ndim != 2 or len(z) < 2 or z.shape[1] != model.embedding_dim:
        raise InputError("latents", f"need [N >= 2, {model.embedding_dim}] cohort codes, got {list(z.shape)}")
    if not k > 0:
        raise InputError("k", f"the perturbation must be positive, got {k}")
    device = model.mask.device
    mean = torch.as_tensor(z.mean(0), dtype=torch.float32, device=device)
    step = torch.as_tensor(k * z.std(0, ddof=1), dtype=torch.float32, device=device)
    mask = model.mask.bool()
    dims = len(mean)
    out = np.empty((dims, *mask.shape), dtype=np.float32)
    training = model.training
    model.eval()
    try:
        for start in range(0, dims, batch_size):
            idx = torch.arange(start, min(start + batch_size, dims), device=device)
            shift = torch.zeros(len(idx), dims, device=device)
            shift[torch.arange(len(idx)), idx] = step[idx]
            change = (decode(mean + shift) - decode(mean - shift)).abs().sum(1)      # [b, X, Y, Z]
            out[start:start + len(idx)] = (change * mask).cpu().numpy()
    finally:
        model.train(training)
    return out


def region_shares(change, atlas: Atlas, mask, dimensions: list[str] | None = None) -> pd.DataFrame:
    """Each map's share of its total change (inside `mask`) per region of `atlas`, plus ``background``.

    `change` is ``[D, X, Y, Z]``, non-negative. Returns the tidy table `COLUMNS`: one row per dimension and
    region, ``rank`` 1 = the region with the largest share of that dimension (background included),
    ``voxels`` the region's brain voxels, ``enrichment`` = share ÷ (voxels / brain voxels). A dimension
    that changes nothing has NaN shares (and is logged).
    """
    change = np.asarray(change, dtype=np.float64)
    mask = np.asarray(mask) > 0
    if change.ndim != 4 or change.shape[1:] != mask.shape or atlas.labels.shape != mask.shape:
        raise InputError("region_shares", f"maps {change.shape[1:]}, mask {mask.shape} and labels "
                                          f"{atlas.labels.shape} must share one grid")
    if (change < 0).any():
        raise InputError("region_shares", "the change maps must be non-negative")
    dimensions = dimensions or dimension_names(len(change))
    labels = atlas.labels.astype(np.int64)[mask]                          # 0 = background inside the mask
    names = [BACKGROUND, *atlas.names]
    # per dimension, the change summed over each label's voxels
    sums = np.stack([np.bincount(labels, weights=c[mask], minlength=len(names)) for c in change])
    voxels = np.bincount(labels, minlength=len(names))
    total = sums.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = sums / total
    dead = np.flatnonzero(total[:, 0] == 0)
    if len(dead):
        log.warning("%d latent dimension(s) change nothing when perturbed (first: %s)", len(dead),
                    ", ".join(dimensions[i] for i in dead[:5]))
    missing = [n for n, v in zip(names[1:], voxels[1:]) if v == 0]
    if missing:
        log.warning("region(s) with no voxel inside the brain mask on this grid: %s", ", ".join(missing))
    table = pd.DataFrame({"dimension": np.repeat(dimensions, len(names)), "region": names * len(change),
                          "share": share.ravel(), "voxels": np.tile(voxels, len(change))})
    table["rank"] = table.groupby("dimension", sort=False)["share"].rank(ascending=False, method="first")
    table["rank"] = table["rank"].astype("Int64")
    with np.errstate(invalid="ignore", divide="ignore"):
        table["enrichment"] = table["share"] / (table["voxels"] / voxels.sum())
    return table.sort_values(["dimension", "rank"], kind="stable").reset_index(drop=True)[list(COLUMNS)]


def latent_regions(model: VolumeModel, latents, atlas: Atlas, k: float = 2.0, *,
                   dimensions: list[str] | None = None, batch_size: int = 16) -> pd.DataFrame:
    """The latent-to-region table of an autoencoder: `latent_change` summarised by `region_shares` inside
    the model's brain mask. `atlas` must lie on the model's grid (`endopheno.featurestore.atlas.atlas_from_files` with ``model.affine``)."""
    change = latent_change(model, latents, k, batch_size=batch_size)
    return region_shares(change, atlas, model.mask.cpu().numpy(), dimensions or dimension_names(len(change)))


def top_regions(table: pd.DataFrame, n: int = 3, *, background: bool = False) -> pd.DataFrame:
    """Each dimension's `n` regions with the largest share (``background`` left out unless asked), one row
    per dimension: ``dimension``, ``regions`` ("hippocampus_L 4.1% (3.2×), amygdala_L 1.2% (2.0×), ..."), and the
    first region with its share and enrichment (``top_region``, ``top_share``, ``top_enrichment``)."""
    rows = table if background else table[table["region"] != BACKGROUND]
    rows = rows.dropna(subset=["share"]).sort_values(["dimension", "share"], ascending=[True, False], kind="stable")
    rows = rows.groupby("dimension", sort=True).head(n)
    out = rows.groupby("dimension", sort=True).agg(
        regions=("region", list), shares=("share", list), enrichments=("enrichment", list), top_region=("region", "first"),
        top_share=("share", "first"), top_enrichment=("enrichment", "first")).reset_index()
    # share of the change, and enrichment (share ÷ the region's share of brain voxels): small regions hold
    # a small share of any change, so the enrichment is what says a dimension is about them
    out["regions"] = [", ".join(f"{r} {100 * s:.1f}% ({e:.1f}×)" for r, s, e in zip(rs, ss, es))
                      for rs, ss, es in zip(out.regions, out.shares, out.enrichments)]
    return out.drop(columns=["shares", "enrichments"])
