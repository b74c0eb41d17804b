"""Ingest and preprocess throughput, store sizes, and reading preprocessed volumes from Zarr vs .nii.gz.

    python benchmarks/bench_volumes.py --bids data/phantom/bids [--preprocess-subjects 40] [--reads 40]

Ingest runs on every subject of the BIDS folder into a fresh store; preprocess on the first
`--preprocess-subjects` of them. The read comparison writes each preprocessed volume as .nii.gz and
reads the same volumes both ways, interleaved, reporting medians per volume and their ratio.
"""

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import zarr

from _common import du, machine

from endopheno.volumes.ingest import ingest, inputs_from_bids
from endopheno.volumes.preprocess import PreprocessParams, preprocess

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--bids", default="data/phantom/bids")
    ap.add_argument("--preprocess-subjects", type=int, default=40)
    ap.add_argument("--reads", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_volumes_"))
    store = work / "volumes.zarr"
    print(f"machine: {machine()}")

    inputs, rejected = inputs_from_bids(args.bids)
    t = time.perf_counter()
    report = ingest(inputs[:-10], store, rejected=rejected, workers=args.workers)
    seconds = time.perf_counter() - t
    n_in = len(report.ingested)
    print(f"ingest: {n_in} volumes in {seconds:.1f} s = {n_in / seconds:.1f} volumes/s ({args.workers} workers)")
    t = time.perf_counter()
    more = ingest(inputs, store, workers=args.workers)
    print(f"ingest after adding 10 subjects: {len(more.ingested)} converted, {len(more.unchanged)} unchanged in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    again = ingest(inputs, store, workers=args.workers)
    print(f"ingest rerun (nothing changed): {len(again.unchanged)} unchanged in {time.perf_counter() - t:.2f} s")
    src_bytes = sum(Path(i.path).stat().st_size for i in inputs)
    print(f"native store: {du(store / 'native') / 2**20:.1f} MiB for {src_bytes / 2**20:.1f} MiB of .nii.gz input "
          f"({du(store / 'native') / src_bytes:.2f}x)")

    small = work / "small.zarr"
    root = zarr.open_group(str(small), mode="w")
    shutil.copy(store / "zarr.json", small / "zarr.json")
    (small / "native").mkdir()
    shutil.copy(store / "native" / "zarr.json", small / "native" / "zarr.json")
    for sub in sorted((store / "native").iterdir())[: args.preprocess_subjects + 1]:
        if sub.is_dir():
            shutil.copytree(sub, small / "native" / sub.name)
    t = time.perf_counter()
    prep = preprocess(small, PreprocessParams(), workers=args.workers)
    seconds = time.perf_counter() - t
    n = len(prep.processed)
    print(f"preprocess: {n} subjects in {seconds:.1f} s = {60 * n / seconds:.1f} subjects/min ({args.workers} workers)")
    print(f"mni store: {du(small / 'mni') / 2**20:.1f} MiB for {n} subjects "
          f"({du(small / 'mni') / n / 2**20:.2f} MiB/subject, float32, zstd)")

    # Read comparison: the same preprocessed volumes from Zarr and from .nii.gz (nibabel), interleaved.
    arr = zarr.open_array(str(small / "mni" / "T1w"), mode="r")
    affine = np.asarray(zarr.open_group(str(small / "mni"), mode="r").attrs["affine"])
    k = min(args.reads, arr.shape[0])
    files = []
    for i in range(k):
        files.append(work / f"v{i}.nii.gz")
        nib.save(nib.Nifti1Image(arr[i], affine), files[-1])
    # A training Dataset opens the array once and reads volume after volume: that is the main figure.
    # Opening the array for every read (zarr parses its metadata each time) is shown too.
    opened = zarr.open_array(str(small / "mni" / "T1w"), mode="r")
    z_times, o_times, n_times = [], [], []
    for rep in range(3):
        for i in range(k):
            t = time.perf_counter()
            zv = opened[i]
            z_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            zarr.open_array(str(small / "mni" / "T1w"), mode="r")[i]
            o_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            nv = np.asarray(nib.load(files[i]).dataobj, dtype=np.float32)
            n_times.append(time.perf_counter() - t)
            assert np.array_equal(zv, nv)
    zm, om, nm = statistics.median(z_times), statistics.median(o_times), statistics.median(n_times)
    nii_size = sum(f.stat().st_size for f in files) / k
    print(f"read one preprocessed volume {arr.shape[1:]} (median of {len(z_times)}, interleaved): "
          f"zarr {1000 * zm:.2f} ms, nii.gz (nibabel) {1000 * nm:.2f} ms -> zarr {nm / zm:.1f}x faster; "
          f"opening the zarr array for every read {1000 * om:.2f} ms ({nm / om:.1f}x)")
    print(f"on disk per volume: zarr {du(small / 'mni' / 'T1w') / arr.shape[0] / 2**20:.2f} MiB, nii.gz {nii_size / 2**20:.2f} MiB")
    shutil.rmtree(work)
