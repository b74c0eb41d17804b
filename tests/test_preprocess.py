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
    while time.time() < deadline and proc.poll() is None and len(list((store / "mni" / "T1w" / "c").glob("*"))) < 1:
        time.sleep(0.01)
    assert proc.poll() is None, f"preprocess exited ({proc.returncode}) before it could be killed mid-run"
    assert list((store / "mni" / "T1w" / "c").glob("*")), "no subject written within 120 s"
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


def _store_of(tmp_path: Path, files: dict[str, Path]) -> Path:
    """A fresh volume store holding `files` (subject -> NIfTI path)."""
    (tmp_path / "m.csv").write_text("subject_id,path\n" + "".join(f"{s},{p}\n" for s, p in files.items()))
    inputs, rejected = inputs_from_manifest(tmp_path / "m.csv")
    report = ingest(inputs, tmp_path / "v.zarr", rejected=rejected, workers=1)
    assert not report.rejected
    return tmp_path / "v.zarr"


def _first_native(ingested_store: Path) -> tuple[str, Path]:
    """(subject, source file) of the store's first native volume."""
    some = sorted((ingested_store / "native").glob("*/T1w"))[0]
    return some.parent.name, Path(json.loads((some / "zarr.json").read_text())["attributes"]["source"]["path"])


def test_single_frame_4d_is_preprocessed_as_3d(preprocessed_store, ingested_store, tmp_path):
    """Ingest keeps a 4D file of one frame (as 3D); preprocessing gives it the very numbers of its 3D twin
    (ITK read the 4D array as a 3D image of vectors and failed)."""
    import gzip
    import io

    subject, source = _first_native(ingested_store)
    raw = gzip.decompress(source.read_bytes())
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
    header["dim"][0], header["dim"][4] = 4, 1  # the same voxels, declared (x, y, z, 1)
    (tmp_path / "one_frame.nii.gz").write_bytes(gzip.compress(header.binaryblock + raw[348:]))
    store = _store_of(tmp_path, {"fourd": tmp_path / "one_frame.nii.gz"})
    report = preprocess(store, PreprocessParams(), workers=1)
    assert report.processed == ["fourd"] and not report.failed
    got, want = open_mni(store), open_mni(preprocessed_store)
    assert np.array_equal(got["T1w"].sel(subject="fourd").values, want["T1w"].sel(subject=subject).values)
    assert np.array_equal(got["template_to_native"].sel(subject="fourd").values, want["template_to_native"].sel(subject=subject).values)


def _negative_store(ingested_store: Path, tmp_path: Path) -> Path:
    """A store whose one subject has no voxel above 0 (a phantom volume negated)."""
    _, source = _first_native(ingested_store)
    img = nib.load(source)
    nib.save(nib.Nifti1Image(-img.get_fdata(dtype=np.float32) - 1, img.affine), tmp_path / "negative.nii.gz")
    return _store_of(tmp_path, {"neg": tmp_path / "negative.nii.gz"})


def test_image_without_positive_voxels_fails_with_one_clear_line(ingested_store, tmp_path):
    """A volume with no intensity above 0 passes ingest (it is neither empty nor constant) but cannot be
    bias-corrected or registered: the subject fails with one line saying why, not ITK's multi-line error."""
    store = _negative_store(ingested_store, tmp_path)
    report = preprocess(store, PreprocessParams(), workers=1)
    assert report.processed == []
    assert report.failed == [("neg", "no voxel above 0: expected a magnitude image (bias correction and registration need positive intensities)")]
    ds = open_mni(store)
    assert str(ds["note"].values[0]) == "failed: " + report.failed[0][1] and ds["source_sha256"].values[0] == ""


def test_params_refuse_unknown_keys_and_normalise_numbers():
    """params.yaml's `preprocess` section: a typo is an error, not a silent default; `2` and `2.0` are the
    same parameters (the same digest, so no rebuild); YAML 1.1's string `1e-2` is a number."""
    import yaml

    from endopheno.errors import EndophenoError

    section = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["preprocess"]
    assert PreprocessParams.from_dict(section).digest() == PreprocessParams().digest()  # the stage's own keys are skipped
    with pytest.raises(EndophenoError, match="preprocess: unknown parameter.s. voxel_size"):
        PreprocessParams.from_dict({**section, "voxel_size": 1.0})
    assert PreprocessParams.from_dict({"voxel_size_mm": 2, "crop_margin_mm": 6}).digest() == PreprocessParams().digest()
    assert PreprocessParams(voxel_size_mm=2).digest() == PreprocessParams().digest()
    assert PreprocessParams.from_dict({"min_step_mm": "1e-2", "pyramid": [4, 2]}) == PreprocessParams()
    assert PreprocessParams.from_dict({"crop_margin_mm": None}).crop_margin_mm is None


def test_rerun_after_a_crash_while_the_group_was_created(ingested_store, tmp_path):
    """A crash inside the group's creation leaves it without its last arrays: the rerun rebuilds it
    (it stopped on a KeyError before)."""
    import zarr

    from endopheno.volumes.preprocess import _create

    subject, source = _first_native(ingested_store)
    store = _store_of(tmp_path, {subject: source})
    _create(store, PreprocessParams())
    del zarr.open_group(str(store), path="mni", mode="r+")["note"]  # killed before the last array was created
    report = preprocess(store, PreprocessParams(), workers=1)
    assert report.processed == [subject]
    ds = open_mni(store)
    assert ds["subject"].values.tolist() == [subject] and (ds["source_sha256"].values != "").all()


def test_rerun_after_a_crash_while_rows_were_added(preprocessed_store, ingested_store, tmp_path):
    """A crash after the per-subject arrays grew but before the new rows got their labels: the rerun
    labels those rows, instead of leaving unlabelled rows behind and adding the subjects again."""
    import zarr

    store = tmp_path / "v.zarr"
    shutil.copytree(preprocessed_store, store)
    subject, source = _first_native(ingested_store)
    (tmp_path / "m.csv").write_text(f"subject_id,path\nextra,{source}\n")
    inputs, _ = inputs_from_manifest(tmp_path / "m.csv")
    ingest(inputs, store, workers=1)
    g = zarr.open_group(str(store), path="mni", mode="r+")
    for _, arr in g.arrays():  # what preprocess does first when it adds a row; killed right after
        if (arr.metadata.dimension_names or [None])[0] == "subject":
            arr.resize((7, *arr.shape[1:]))
    report = preprocess(store, PreprocessParams(), workers=1)
    assert report.processed == ["extra"] and report.unchanged == 6
    ds = open_mni(store)
    assert ds["subject"].values.tolist() == open_mni(preprocessed_store)["subject"].values.tolist() + ["extra"]
    assert (ds["source_sha256"].values != "").all() and ds["logjac"].shape[0] == 7
    assert np.array_equal(ds["T1w"].sel(subject="extra").values, ds["T1w"].sel(subject=subject).values)


def test_montage_shows_each_subject_once(preprocessed_store, tmp_path):
    """With fewer subjects than panels, the evenly spread picks repeated subjects (6 subjects, 7 rows)."""
    import matplotlib.image

    png = montage(open_mni(preprocessed_store), tmp_path / "montage.png")
    assert matplotlib.image.imread(png).shape[0] == 6 * 2.0 * 110  # one 2-inch row per subject at 110 dpi


def test_qc_outputs_when_no_subject_is_preprocessed(ingested_store, tmp_path):
    """Every subject failed: the QC table and the montage are still written (the montage raised a
    ValueError, which `endopheno preprocess` showed as a traceback, without its summary line), and the
    table's eTIV of a subject not done is NaN without numpy's "invalid value encountered in det"."""
    import warnings

    store = _negative_store(ingested_store, tmp_path)
    assert len(preprocess(store, PreprocessParams(), workers=1).failed) == 1
    ds = open_mni(store)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = qc_table(ds)
    assert table["subject"].tolist() == ["neg"] and np.isnan(table["etiv_mm3"]).all()
    assert montage(ds, tmp_path / "qc" / "montage.png").stat().st_size > 1000
