"""Tensor-based morphometry: log-Jacobian maps that measure a planted volume change, kept up to date
incrementally in the volume store."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import xarray as xr
import zarr

from endopheno.errors import EndophenoError
from endopheno.volumes.morphometry import DONE, MorphometryParams, log_jacobian, morphometry
from endopheno.volumes.preprocess import open_mni, volume_store_digest


def _ball_image(radius: float, n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A head-like volume: a dark ball (a ventricle) of `radius` voxels in a bright, textured brain."""
    idx = np.indices((n, n, n)).astype(np.float32) - (n - 1) / 2
    r = np.sqrt((idx ** 2).sum(0))
    brain = r < 13
    volume = np.where(brain, 1.0 + 0.1 * np.sin(idx[0] / 2) * np.cos(idx[1] / 3), 0.0)
    volume = np.where(r < radius, 0.2, volume).astype(np.float32)
    return volume, brain


@pytest.mark.parametrize("radius, sign", [(6.0, 1), (4.0, -1)])
def test_log_jacobian_measures_a_planted_volume_change(radius, sign):
    template, mask = _ball_image(5.0)
    subject, _ = _ball_image(radius)
    logjac = log_jacobian(subject, template, mask, 2.0, MorphometryParams(levels_mm=[4.0, 2.0], iterations=[50, 20]))
    r = np.sqrt(((np.indices(mask.shape) - (mask.shape[0] - 1) / 2) ** 2).sum(0))
    true = 3 * np.log(radius / 5.0)  # log of the ball's volume ratio
    inside = float(logjac[r < 5].mean())
    # The smoothed demons field spreads the change over its neighbourhood: about a third of it is measured
    # inside the ball (0.20 of 0.55, -0.18 of -0.67), but with the right sign and well above the map far
    # from the ball, where the subject equals the template.
    far = float(np.median(logjac[(r > 9) & (r < 12)]))
    assert np.sign(inside) == sign and abs(inside) > 0.2 * abs(true), (inside, true)
    assert abs(inside) > 2 * abs(far), (inside, far)
    assert (logjac[~mask] == 0).all()


def test_identical_images_give_a_flat_map():
    template, mask = _ball_image(5.0)
    logjac = log_jacobian(template, template, mask, 2.0, MorphometryParams(levels_mm=4.0, iterations=100))
    assert np.abs(logjac).max() < 1e-3


def test_levels_must_be_multiples_of_the_store_and_match_iterations():
    template, mask = _ball_image(5.0)
    with pytest.raises(EndophenoError, match="whole multiple"):
        log_jacobian(template, template, mask, 2.0, MorphometryParams(levels_mm=[3.0], iterations=[10]))
    with pytest.raises(EndophenoError, match="one entry per level"):
        MorphometryParams(levels_mm=[4.0, 2.0], iterations=[100])


def test_store_maps_are_incremental(preprocessed_store, tmp_path):
    store = tmp_path / "v.zarr"
    shutil.copytree(preprocessed_store, store)
    ds = open_mni(store)
    assert ds["logjac"].shape == ds["T1w"].shape
    group = zarr.open_group(str(store), path="mni", mode="r")
    assert group["logjac"].compressors == group["T1w"].compressors   # read as fast as the volumes
    mask = ds.brain_mask.values
    maps = ds["logjac"].values
    assert np.isfinite(maps).all() and (maps[:, ~mask] == 0).all() and np.abs(maps[:, mask]).max() > 0.01
    digest = volume_store_digest(ds)
    assert morphometry(store, workers=1) == []  # nothing new
    # rows not marked done (a crash between the volume and its marker) are redone, and only they
    zarr.open_group(str(store), path="mni", mode="r+")[DONE][1:3] = np.array(["", ""], dtype=object)
    assert sorted(morphometry(store, workers=1)) == [1, 2]
    assert volume_store_digest(open_mni(store)) == digest
    # new knobs: every map is recomputed, and the store's digest (which models and feature sets record) changes
    assert len(morphometry(store, MorphometryParams(levels_mm=[4.0], iterations=[20]), workers=1)) == 6
    changed = xr.open_zarr(store, group="mni")
    assert volume_store_digest(changed) != digest
    assert not np.allclose(changed["logjac"].values, maps)


def test_rerun_after_a_crash_between_the_map_and_its_marker(preprocessed_store, tmp_path):
    """The map and its done-marker are created (and, for new knobs, deleted) one after the other: a crash
    in between leaves one without the other, and the rerun recomputes the maps (it stopped on a KeyError
    or ContainsArrayError before)."""
    from endopheno.volumes.morphometry import MAP

    store = tmp_path / "v.zarr"
    shutil.copytree(preprocessed_store, store)
    quick = MorphometryParams(levels_mm=[4.0], iterations=[2])
    for missing in (MAP, DONE):  # killed between deleting the old map and its marker; between creating the two
        del zarr.open_group(str(store), path="mni", mode="r+")[missing]
        assert len(morphometry(store, quick, workers=1)) == 6
        ds = open_mni(store)
        assert ds["logjac"].shape == ds["T1w"].shape and (ds[DONE].values == ds["source_sha256"].values).all()
