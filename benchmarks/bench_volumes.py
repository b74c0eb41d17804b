"""Ingest and preprocess throughput and store sizes (reads: bench_read.py).

    python benchmarks/bench_volumes.py --bids data/phantom/bids [--preprocess-subjects 40]

Ingest runs on every subject but the last 10 of the BIDS folder into a fresh store, then on all of them
(the 10 added), then again (nothing changed); preprocess runs on the first `--preprocess-subjects`.
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import zarr

from _common import du, machine

from endopheno.volumes.ingest import ingest, inputs_from_bids
from endopheno.volumes.preprocess import PreprocessParams, preprocess

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--bids", default="data/phantom/bids")
    ap.add_argument("--preprocess-subjects", type=int, default=40)
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
    print(f"mni store: {du(small / 'mni') / 2**20:.1f} MiB for {n} subjects ({du(small / 'mni') / n / 2**20:.2f} MiB/subject)")

    shutil.rmtree(work)
