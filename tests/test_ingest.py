"""Ingest: every kind of bad input is rejected with one clear line while the good subjects land;
reruns are incremental; a kill -9 leaves a readable store that the rerun completes."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import zarr

from endopheno.volumes.ingest import ingest, inputs_from_bids, inputs_from_manifest
from endopheno.volumes.store import ScanKey, iter_native, native_digest, read_native, scaled

from conftest import cli


def _good(phantom_dir: Path, i: int) -> Path:
    return sorted((phantom_dir / "bids").glob("sub-*/anat/*_T1w.nii.gz"))[i]


def _save(img, path: Path) -> Path:
    nib.save(img, path)
    return path


def _with_sform(data: np.ndarray, sform: np.ndarray) -> nib.Nifti1Image:
    """An image whose header holds exactly `sform` (no qform), bypassing nibabel's affine checks."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(np.float32)
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = sform[0], sform[1], sform[2]
    return nib.Nifti1Image(data, None, header=hdr)


def _bad_files(phantom_dir: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """One file per kind of bad input, with the words its rejection must contain."""
    good = nib.load(_good(phantom_dir, 0))
    data = good.get_fdata(dtype=np.float32)
    aff = good.affine
    raw = _good(phantom_dir, 0).read_bytes()
    bad = {}
    bad["missing"] = (folder / "nowhere.nii.gz", "missing file")
    (folder / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    bad["truncated"] = (folder / "truncated.nii.gz", "truncated or corrupt gzip")
    corrupt = bytearray(raw)
    corrupt[len(raw) // 2: len(raw) // 2 + 64] = bytes(64)
    (folder / "corrupt.nii.gz").write_bytes(bytes(corrupt))
    bad["corrupt"] = (folder / "corrupt.nii.gz", "corrupt gzip")
    (folder / "notgzip.nii.gz").write_text("subject_id,age\n1,70\n")
    bad["not_gzip"] = (folder / "notgzip.nii.gz", "not a gzip file")
    (folder / "notnifti.nii").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(600))
    bad["not_nifti"] = (folder / "notnifti.nii", "not a NIfTI")
    (folder / "notnifti2.nii.gz").write_bytes(gzip.compress(b"hello world, this is text" * 40))
    bad["not_nifti_gz"] = (folder / "notnifti2.nii.gz", "not a NIfTI")
    bad["4d"] = (_save(nib.Nifti1Image(np.stack([data] * 3, -1), aff), folder / "fmri.nii.gz"), "4D volume with 3 frames")
    singular = aff.copy()
    singular[:, 2] = 0
    bad["singular"] = (_save(_with_sform(data, singular), folder / "singular.nii.gz"), "singular affine")
    nonfinite = aff.copy()
    nonfinite[0, 0] = np.nan
    bad["nonfinite"] = (_save(_with_sform(data, nonfinite), folder / "nonfinite.nii.gz"), "non-finite affine")
    nan = data.copy()
    nan[10, 10, 10:15] = np.nan
    bad["nan"] = (_save(nib.Nifti1Image(nan, aff), folder / "nan.nii.gz"), "5 NaN/Inf voxels")
    bad["empty"] = (_save(nib.Nifti1Image(np.zeros_like(data), aff), folder / "empty.nii.gz"), "empty volume")
    bad["constant"] = (_save(nib.Nifti1Image(np.full_like(data, 7.0), aff), folder / "constant.nii.gz"), "constant volume")
    huge = aff.copy()
    huge[:3, :3] *= 25
    bad["voxel_size"] = (_save(nib.Nifti1Image(data, huge), folder / "huge.nii.gz"), "absurd voxel size")
    return bad


def test_every_bad_input_is_rejected_and_good_subjects_land(phantom_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    bad = _bad_files(phantom_dir, folder)
    rows = ["subject_id,path"]
    rows += [f"good{i},{_good(phantom_dir, i)}" for i in range(3)]
    rows += [f"{kind.replace('_', '')},{path}" for kind, (path, _) in bad.items()]
    rows += [f"dup,{_good(phantom_dir, 3)}", f"dup,{_good(phantom_dir, 4)}"]  # the same subject twice
    rows += ["bad/id,x.nii.gz"]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")

    proc = cli("ingest", "--manifest", str(manifest), "--store", str(tmp_path / "v.zarr"), "--workers", "1")
    assert proc.returncode == 1  # finished, but something was rejected
    lines = [line for line in proc.stderr.splitlines() if line.startswith("rejected ")]
    for kind, (path, words) in bad.items():
        mine = [line for line in lines if str(path) in line]
        assert len(mine) == 1, f"{kind}: {mine}"
        assert words in mine[0], f"{kind}: {mine[0]}"
    dup_lines = [line for line in lines if "duplicate subject dup" in line]
    assert len(dup_lines) == 2  # both copies, each naming the other
    assert any("subject_id 'bad/id' is not a valid label" in line for line in lines)
    assert len(lines) == len(bad) + 3
    assert f"3 ingested, 0 unchanged, {len(bad) + 3} rejected" in proc.stderr
    stored = {key.subject_id for key, _ in iter_native(tmp_path / "v.zarr")}
    assert stored == {"good0", "good1", "good2"}


def _ingest_as(uid: int, manifest: Path, store: Path, queue) -> None:
    try:
        # While still root, one ingest into a scratch store loads every module ingest imports lazily:
        # `nobody` may not be allowed to read the virtual environment.
        warm, _ = inputs_from_manifest(manifest)
        ingest(warm[:1], store.with_name("warm.zarr"), workers=1)
        os.setgid(uid)
        os.setuid(uid)
        inputs, rejected = inputs_from_manifest(manifest)
        report = ingest(inputs, store, rejected=rejected, workers=1)
        queue.put((report.ingested, report.rejected))
    except Exception as e:  # noqa: BLE001 - hand the failure to the test
        queue.put(e)


def test_unreadable_file_is_rejected(phantom_dir):
    """A file the user may not read. Root ignores file permissions, so as root the ingest runs in a
    child that has dropped to user `nobody` (in a folder outside pytest's private tmp). The child is a
    fresh interpreter (spawn), not a fork of this pytest worker: a fork inherits the locks of the threads
    earlier tests left running here and once hung in CI for the whole timeout without a word."""
    import multiprocessing
    import queue as queues
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="endopheno_perm_"))
    shutil.copy(_good(phantom_dir, 0), folder / "ok.nii.gz")
    shutil.copy(_good(phantom_dir, 1), folder / "locked.nii.gz")
    (folder / "m.csv").write_text(f"subject_id,path\nok,{folder / 'ok.nii.gz'}\nlocked,{folder / 'locked.nii.gz'}\n")
    for p in [folder, folder / "ok.nii.gz", folder / "m.csv"]:
        os.chmod(p, 0o777)
    os.chmod(folder / "locked.nii.gz", 0)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_ingest_as, args=(65534 if os.geteuid() == 0 else os.geteuid(), folder / "m.csv", folder / "v.zarr", queue))
    child.start()
    try:
        result = queue.get(timeout=120)
    except queues.Empty:
        child.kill()
        child.join()
        raise AssertionError(f"the ingest child said nothing in 120 s (exit code {child.exitcode})") from None
    child.join()
    shutil.rmtree(folder)
    assert not isinstance(result, Exception), result
    ingested, rejected = result
    assert ingested == ["subject ok T1w"]
    assert rejected == [(str(folder / "locked.nii.gz"), "permission denied (file not readable)")]


def test_single_frame_4d_is_accepted_as_3d(phantom_dir, tmp_path):
    img = nib.load(_good(phantom_dir, 0))
    path = _save(nib.Nifti1Image(img.get_fdata(dtype=np.float32)[..., None], img.affine), tmp_path / "one.nii.gz")
    (tmp_path / "m.csv").write_text(f"subject_id,path\ns1,{path}\n")
    inputs, rejected = inputs_from_manifest(tmp_path / "m.csv")
    report = ingest(inputs, tmp_path / "v.zarr", rejected=rejected, workers=1)
    assert report.ingested == ["subject s1 T1w"] and not report.rejected
    arr = zarr.open_array(str(tmp_path / "v.zarr" / "native" / "s1" / "T1w"), mode="r")
    assert arr.ndim == 3 and "4D with one frame" in arr.attrs["notes"][0]


def test_native_volume_is_lossless(ingested_store, phantom_dir):
    for key, arr in iter_native(ingested_store):
        original = gzip.decompress(Path(arr.attrs["source"]["path"]).read_bytes())
        back = read_native(ingested_store, key.subject_id)
        assert back.to_bytes() == original  # the very file, byte for byte
        src = nib.load(arr.attrs["source"]["path"])
        assert np.array_equal(back.affine, src.affine)
        assert np.allclose(scaled(arr), src.get_fdata(dtype=np.float32), rtol=1e-6, atol=1e-4)
        assert arr.attrs["orientation"] == "".join(nib.aff2axcodes(src.affine))


def _copy_bids(phantom_dir: Path, dest: Path, n: int) -> Path:
    bids = dest / "bids"
    for sub in sorted((phantom_dir / "bids").glob("sub-*"))[:n]:
        shutil.copytree(sub, bids / sub.name)
    return bids


def test_rerun_is_incremental(phantom_dir, tmp_path):
    bids = _copy_bids(phantom_dir, tmp_path, 4)
    store = tmp_path / "v.zarr"
    first = ingest(_bids(bids), store, workers=1)
    assert len(first.ingested) == 4
    digest, items = native_digest(store)
    again = ingest(_bids(bids), store, workers=1)
    assert again.ingested == [] and len(again.unchanged) == 4
    assert native_digest(store)[0] == digest

    files = sorted(bids.glob("sub-*/anat/*.nii.gz"))
    os.utime(files[0], ns=(time.time_ns(), time.time_ns() + 10**9))  # touched, same content
    img = nib.load(files[1])
    nib.save(nib.Nifti1Image(img.get_fdata(dtype=np.float32) * 2, img.affine), files[1])  # content changed
    shutil.copytree(sorted((phantom_dir / "bids").glob("sub-*"))[4], bids / sorted((phantom_dir / "bids").glob("sub-*"))[4].name)
    third = ingest(_bids(bids), store, workers=1)
    changed = ScanKey(files[1].name.split("_")[0].removeprefix("sub-"))
    new = sorted((phantom_dir / "bids").glob("sub-*"))[4].name.removeprefix("sub-")
    assert sorted(third.ingested) == sorted([str(changed), str(ScanKey(new))])
    assert len(third.unchanged) == 3
    # The digest DVC's later stages depend on follows content: the touched file keeps its hash, the changed one not.
    touched = ScanKey(files[0].name.split("_")[0].removeprefix("sub-"))
    digest3, items3 = native_digest(store)
    assert digest3 != digest and items3[touched.path] == items[touched.path] and items3[changed.path] != items[changed.path]
    assert len(items3) == 5
    assert np.allclose(scaled(zarr.open_array(str(store / changed.path), mode="r")), img.get_fdata(dtype=np.float32) * 2, rtol=1e-5)


def _bids(bids: Path):
    inputs, rejected = inputs_from_bids(bids)
    assert not rejected
    return inputs


def test_kill_minus_nine_leaves_a_readable_store(phantom_dir, tmp_path):
    files = sorted((phantom_dir / "bids").glob("sub-*/anat/*_T1w.nii.gz"))
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject_id,path\n" + "".join(f"s{i},{files[i % len(files)]}\n" for i in range(30)))
    store = tmp_path / "v.zarr"
    exe = Path(sys.executable).with_name("endopheno")
    proc = subprocess.Popen([str(exe), "ingest", "--manifest", str(manifest), "--store", str(store), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list((store / "native").glob("*/T1w")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = list(iter_native(store))  # readable, and every volume in it is whole
    assert 0 < len(done) < 30
    for key, arr in done:
        assert arr[...].any() and arr.attrs["source"]["sha256"]
    inputs, _ = inputs_from_manifest(manifest)
    report = ingest(inputs, store, workers=1)
    assert len(report.ingested) == 30 - len(done) and len(report.unchanged) == len(done)
    assert len(list(iter_native(store))) == 30


def test_bids_sessions_runs_and_bad_names(phantom_dir, tmp_path):
    src = _good(phantom_dir, 0)
    layout = ["sub-a/ses-1/anat/sub-a_ses-1_T1w.nii.gz", "sub-a/ses-2/anat/sub-a_ses-2_T1w.nii.gz",
              "sub-b/anat/sub-b_run-1_T1w.nii.gz", "sub-b/anat/sub-b_run-2_T1w.nii.gz", "sub-c/anat/T1.nii.gz"]
    for rel in layout:
        (tmp_path / "bids" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, tmp_path / "bids" / rel)
    inputs, rejected = inputs_from_bids(tmp_path / "bids")
    assert [r for r in rejected if "T1.nii.gz" in r[0]][0][1].startswith("file name does not follow BIDS")
    report = ingest(inputs, tmp_path / "v.zarr", rejected=rejected, workers=1)
    assert sorted(report.ingested) == ["subject a session 1 T1w", "subject a session 2 T1w", "subject b T1w"]
    assert any("sub-b_run-2_T1w" in what and "another run of subject b T1w (run 1 is ingested)" == why for what, why in report.rejected)
    keys = {key for key, _ in iter_native(tmp_path / "v.zarr")}
    assert keys == {ScanKey("a", "1"), ScanKey("a", "2"), ScanKey("b")}
    assert (tmp_path / "v.zarr" / "native" / "a" / "ses-1" / "T1w" / "zarr.json").exists()


def _tiny(dtype="float32") -> nib.Nifti1Image:
    rng = np.random.default_rng(0)
    return nib.Nifti1Image((rng.random((10, 11, 12)) * 100 + 1).astype(dtype), np.diag([2.0, 2.0, 2.0, 1.0]))


def _ingest_files(tmp_path: Path, files: dict[str, Path]):
    (tmp_path / "m.csv").write_text("subject_id,path\n" + "".join(f"{s},{p}\n" for s, p in files.items()))
    inputs, rejected = inputs_from_manifest(tmp_path / "m.csv")
    return ingest(inputs, tmp_path / "v.zarr", rejected=rejected, workers=1)


def test_voxel_offset_inside_the_header_is_rejected(tmp_path):
    """A .nii whose vox_offset points into its header: nibabel reads the header's bytes as voxels, so
    the volume stored would be garbage (and could not be rebuilt as a NIfTI)."""
    good = _tiny("int16").to_bytes()
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(good), check=False)
    header["vox_offset"] = 0
    (tmp_path / "zero.nii").write_bytes(header.binaryblock + good[348:])
    (tmp_path / "good.nii").write_bytes(good)
    report = _ingest_files(tmp_path, {"zero": tmp_path / "zero.nii", "good": tmp_path / "good.nii"})
    assert report.ingested == ["subject good T1w"]
    assert report.rejected == [(str(tmp_path / "zero.nii"), "vox_offset 0 lies inside the header (the voxels of a single-file NIfTI start at byte 352 or later)")]
    assert np.array_equal(np.asanyarray(read_native(tmp_path / "v.zarr", "good").dataobj), np.asanyarray(_tiny("int16").dataobj))


def test_complex_and_rgb_voxels_are_rejected(tmp_path):
    """A structural volume holds real intensities: complex data (whose NaNs the NaN check did not see,
    and whose imaginary part preprocessing dropped) and RGB data are refused with their data type."""
    cplx = np.asanyarray(_tiny("complex64").dataobj).copy()
    cplx[1, 1, 1] = np.nan
    _save(nib.Nifti1Image(cplx, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "complex.nii.gz")
    rgb = np.zeros((10, 11, 12), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = np.random.default_rng(0).integers(0, 255, rgb.shape)
    _save(nib.Nifti1Image(rgb, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "rgb.nii.gz")
    _save(_tiny(), tmp_path / "good.nii.gz")
    report = _ingest_files(tmp_path, {"cplx": tmp_path / "complex.nii.gz", "rgb": tmp_path / "rgb.nii.gz", "good": tmp_path / "good.nii.gz"})
    assert report.ingested == ["subject good T1w"]
    reasons = dict(report.rejected)
    assert reasons[str(tmp_path / "complex.nii.gz")] == "voxel data type complex64 is not a real number type (complex or RGB data are not a structural volume)"
    assert reasons[str(tmp_path / "rgb.nii.gz")] == "voxel data type RGB is not a real number type (complex or RGB data are not a structural volume)"


def test_rejection_reason_is_one_line(tmp_path):
    """nibabel's message for a short data block spans two lines; the user gets one."""
    (tmp_path / "short.nii").write_bytes(_tiny().to_bytes()[:1000])
    report = _ingest_files(tmp_path, {"short": tmp_path / "short.nii"})
    [(what, reason)] = report.rejected
    assert what == str(tmp_path / "short.nii") and reason.startswith("truncated or unreadable voxel data (")
    assert "\n" not in reason and "  " not in reason


def test_bids_labels_must_match_their_folders(phantom_dir, tmp_path):
    """The subject and session come from the file name; a name that contradicts its folders (a copied or
    renamed file) is rejected rather than stored under the wrong subject or session."""
    src = _good(phantom_dir, 0)
    layout = ["sub-a/ses-1/anat/sub-a_ses-1_T1w.nii.gz", "sub-a/ses-2/anat/sub-a_ses-1_T1w.nii.gz",
              "sub-b/ses-1/anat/sub-b_T1w.nii.gz", "sub-c/anat/sub-d_T1w.nii.gz", "sub-e/anat/sub-e_ses-1_T1w.nii.gz"]
    for rel in layout:
        (tmp_path / "bids" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, tmp_path / "bids" / rel)
    inputs, rejected = inputs_from_bids(tmp_path / "bids")
    assert [i.key for i in inputs] == [ScanKey("a", "1")]
    assert sorted(rejected) == sorted([
        (str(tmp_path / "bids" / "sub-a/ses-2/anat/sub-a_ses-1_T1w.nii.gz"), "its name says sub-a_ses-1 but it lies in sub-a/ses-2/anat (a BIDS file name repeats its folders' labels)"),
        (str(tmp_path / "bids" / "sub-b/ses-1/anat/sub-b_T1w.nii.gz"), "its name says sub-b but it lies in sub-b/ses-1/anat (a BIDS file name repeats its folders' labels)"),
        (str(tmp_path / "bids" / "sub-c/anat/sub-d_T1w.nii.gz"), "its name says sub-d but it lies in sub-c/anat (a BIDS file name repeats its folders' labels)"),
        (str(tmp_path / "bids" / "sub-e/anat/sub-e_ses-1_T1w.nii.gz"), "its name says sub-e_ses-1 but it lies in sub-e/anat (a BIDS file name repeats its folders' labels)"),
    ])
