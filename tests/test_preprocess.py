"""Preprocessing: poses recovered within a voxel of the truth, a labelled Dataset, QC that flags a
bad subject, incremental reruns and crash safety."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import xarray as xr

from endopheno.volumes.ingest import ingest, inputs_from_manifest
from endopheno.volumes.preprocess import (PreprocessParams, open_mni, preprocess, target_grid, to_sitk, transform_to_ras,
                                          volume_store_digest)
from endopheno.volumes.qc import mean_displacement, montage, qc_table

from conftest import cli


def test_pose_recovered_within_one_voxel(preprocessed_store, phantom_dir):
    ds = xr.open_zarr(preprocessed_store, group="mni")
    truth = json.loads((phantom_dir / "ground_truth" / "acquisition.json").read_text())
    mask = ds["brain_mask"].values
    affine = np.asarray(ds.attrs["affine"])
    voxel = ds.attrs["preprocess"]["voxel_size_mm"]
    for i, subject in enumerate(ds["subject"].values):
        err = mean_displacement(ds["template_to_native"].values[i], np.asarray(truth[str(subject)]["template_to_scanner"]), mask, affine)
        assert err < voxel, f"{subject}: {err:.2f} mm"


def test_mni_dataset_is_labelled(preprocessed_store):
    ds = xr.open_zarr(preprocessed_store, group="mni")
    t1 = ds["T1w"]
    assert t1.dims == ("subject", "x", "y", "z")
    assert t1.shape[0] == 6 and ds["x"].attrs["units"] == "mm"
    assert np.allclose(np.diff(ds["x"].values), 2.0)
    assert t1.encoding["chunks"] == (1, *t1.shape[1:])  # one chunk per subject
    vol = t1.sel(subject=str(ds["subject"].values[0])).values
    inside = vol[ds["brain_mask"].values]
    assert abs(inside.mean()) < 1e-3 and abs(inside.std() - 1) < 1e-3  # z-scored inside the mask
    assert (vol[~ds["brain_mask"].values] == 0).all()
    assert ds["qc_pass"].values.all() and (ds["qc_correlation"].values > 0.75).all()
    # The left hemisphere is at negative x (RAS): the template's left-right asymmetry is small, so
    # check with the orientation of a world coordinate instead: the cerebellum is posterior-inferior.
    assert ds["template"].sel(x=0, y=-60, z=-30, method="nearest") > 0


def test_sitk_conversion_round_trip():
    rng = np.random.default_rng(0)
    affine = np.array([[0, 0, -1.2, 90], [-2.0, 0, 0, 100], [0, 1.5, 0, -60], [0, 0, 0, 1]])
    data = rng.random((10, 12, 14)).astype(np.float32)
    img = to_sitk(data, affine)
    # Physical point of voxel (i, j, k) in ITK (LPS) must be the NIfTI world point with x, y negated.
    for ijk in [(0, 0, 0), (3, 5, 7), (9, 11, 13)]:
        lps = np.asarray(img.TransformIndexToPhysicalPoint(ijk))
        ras = affine[:3, :3] @ ijk + affine[:3, 3]
        assert np.allclose(lps, ras * [-1, -1, 1])
        assert img.GetPixel(ijk) == pytest.approx(data[ijk])
    import SimpleITK as sitk

    tx = sitk.AffineTransform(3)
    tx.SetMatrix([1, 0.1, 0, 0, 1, 0, 0, 0, 0.9])
    tx.SetTranslation([2, -3, 4])
    tx.SetCenter([5, 6, 7])
    m = transform_to_ras(tx)
    p_ras = np.array([10.0, -20.0, 30.0])
    q_lps = np.asarray(tx.TransformPoint((p_ras * [-1, -1, 1]).tolist()))
    assert np.allclose(m[:3, :3] @ p_ras + m[:3, 3], q_lps * [-1, -1, 1])


def test_bad_subject_is_flagged_not_dropped(preprocessed_store, ingested_store, tmp_path):
    store = tmp_path / "v.zarr"
    shutil.copytree(preprocessed_store, store)
    # A volume that is not a brain: smooth noise, same grid as a phantom subject.
    some = next((ingested_store / "native").glob("*/T1w"))
    src = json.loads((some / "zarr.json").read_text())["attributes"]
    rng = np.random.default_rng(1)
    from scipy import ndimage as ndi

    blob = np.abs(ndi.gaussian_filter(rng.standard_normal(src["shape"]), 4)).astype(np.float32) * 1000
    path = tmp_path / "blob.nii.gz"
    nib.save(nib.Nifti1Image(blob, np.asarray(src["affine"])), path)
    (tmp_path / "m.csv").write_text(f"subject_id,path\nblob,{path}\n")
    inputs, _ = inputs_from_manifest(tmp_path / "m.csv")
    ingest(inputs, store, workers=1)
    report = preprocess(store, PreprocessParams(), workers=1)
    assert report.processed == ["blob"] and report.unchanged == 6  # only the new subject is processed
    assert [s for s, _ in report.qc_failed] == ["blob"]
    ds = xr.open_zarr(store, group="mni")
    row = list(ds["subject"].values).index("blob")
    assert not bool(ds["qc_pass"].values[row]) and "QC: correlation" in str(ds["note"].values[row])
    assert ds["qc_pass"].values.sum() == 6
    # the log-Jacobian maps grew with the store (readable above) and only the new subject's is computed
    from endopheno.volumes.morphometry import morphometry

    assert np.isnan(ds["logjac"].values[row]).all()
    assert morphometry(store, workers=1) == [row]
    table = qc_table(ds)
    assert table.loc[table.subject == "blob", "qc_pass"].item() is False or not table.loc[table.subject == "blob", "qc_pass"].item()
    png = montage(ds, tmp_path / "montage.png")
    assert png.stat().st_size > 20_000


def test_rerun_does_nothing_and_param_change_rebuilds(preprocessed_store, tmp_path):
    store = tmp_path / "v.zarr"
    shutil.copytree(preprocessed_store, store)
    before = volume_store_digest(open_mni(store))
    report = preprocess(store, PreprocessParams(), workers=1)
    assert report.processed == [] and report.unchanged == 6
    assert volume_store_digest(open_mni(store)) == before  # what DVC's later stages see: unchanged
    # A different output grid cannot share the array: the group is rebuilt at the new size.
    report = preprocess(store, PreprocessParams(voxel_size_mm=4.0), workers=1)
    assert len(report.processed) == 6
    ds = xr.open_zarr(store, group="mni")
    assert ds["T1w"].shape[1:] == target_grid(4.0, 6.0)[0]
    assert volume_store_digest(ds) != before


def test_kill_minus_nine_mid_preprocess(ingested_store, tmp_path):
    store = tmp_path / "v.zarr"
    shutil.copytree(ingested_store, store)
    exe = Path(sys.executable).with_name("endopheno")
    proc = subprocess.Popen([str(exe), "preprocess", "--store", str(store), "--workers", "1", "--params", str(tmp_path / "none.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill once the rows exist (metadata consolidated) and at least one subject is being written.
    deadline = time.time() + 120
    while time.time() < deadline and len(list((store / "mni" / "T1w" / "c").glob("*"))) < 1:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ds = xr.open_zarr(store, group="mni")  # readable
    assert ds["T1w"].shape[0] == 6
    finished = int((ds["source_sha256"].values != "").sum())
    assert finished < 6
    report = preprocess(store, PreprocessParams(), workers=1)
    assert len(report.processed) == 6 - finished and report.unchanged == finished
    ds = xr.open_zarr(store, group="mni")
    assert (ds["source_sha256"].values != "").all() and np.isfinite(ds["T1w"].values).all()


def test_cli_preprocess_writes_qc(preprocessed_store, tmp_path):
    store = tmp_path / "v.zarr"
    shutil.copytree(preprocessed_store, store)
    proc = cli("preprocess", "--store", str(store), "--workers", "1", "--params", str(tmp_path / "none.yaml"),
               "--digest-file", str(tmp_path / "mni.json"), check=0)
    assert "0 processed, 6 unchanged" in proc.stderr
    assert (tmp_path / "qc" / "montage.png").exists() and (tmp_path / "qc" / "qc.tsv").exists()
    ds = open_mni(store)
    digest = json.loads((tmp_path / "mni.json").read_text())
    assert digest["group"] == "mni" and digest["digest"] == volume_store_digest(ds)
    assert sorted(digest["items"]) == sorted(ds["subject"].values.tolist())


def test_unknown_codec_is_a_clear_error(ingested_store, tmp_path):
    from endopheno.errors import EndophenoError

    store = tmp_path / "v.zarr"
    shutil.copytree(ingested_store, store)
    with pytest.raises(EndophenoError, match="preprocess.codec 'gzip': expected one of none, lz4, zstd"):
        preprocess(store, PreprocessParams(codec="gzip"), workers=1)
