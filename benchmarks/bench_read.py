"""Reading preprocessed volumes: from the Zarr store vs the same volumes as .nii.gz with nibabel.

    python benchmarks/bench_read.py [--store stores/volumes.zarr] [--n 40] [--upsample 2]

The first `--n` volumes of mni/T1w are written both ways (Zarr: each codec of `--codecs`, one chunk
per volume; NIfTI: gzip, nibabel's default), then read back interleaved, three rounds; medians per
volume. The Zarr array is opened once, as a training Dataset does. `--upsample 2` repeats the
comparison on the volumes resampled to half the voxel size (1 mm, the size of real research data).
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
from scipy import ndimage as ndi

from _common import du, machine

from endopheno.volumes.preprocess import CODECS


def compare(volumes: np.ndarray, affine: np.ndarray, work: Path, label: str, codec: str) -> None:
    path = work / f"{label}_{codec}.zarr"
    arr = zarr.create_array(str(path), shape=volumes.shape, chunks=(1, *volumes.shape[1:]),
                            dtype="float32", compressors=[CODECS[codec]] if CODECS[codec] else None)
    arr[...] = volumes
    files = [work / f"{label}_{i}.nii.gz" for i in range(len(volumes))]
    for f, v in zip(files, volumes):
        nib.save(nib.Nifti1Image(v, affine), f)
    opened = zarr.open_array(str(path), mode="r")
    z_times, n_times = [], []
    for _ in range(3):
        for i, f in enumerate(files):
            t = time.perf_counter()
            zv = opened[i]
            z_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            nv = np.asarray(nib.load(f).dataobj, dtype=np.float32)
            n_times.append(time.perf_counter() - t)
            assert np.array_equal(zv, nv)
    zm, nm = statistics.median(z_times), statistics.median(n_times)
    print(f"{label}, zarr codec {codec}: volume {volumes.shape[1:]} float32 ({volumes[0].nbytes / 2**20:.1f} MiB): zarr {1000 * zm:.2f} ms, "
          f"nii.gz {1000 * nm:.2f} ms per volume (median of {len(z_times)}) -> zarr {nm / zm:.1f}x faster; "
          f"on disk zarr {du(path) / len(files) / 2**20:.2f} MiB, nii.gz {sum(f.stat().st_size for f in files) / len(files) / 2**20:.2f} MiB per volume")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default="stores/volumes.zarr")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--upsample", type=int, default=2)
    ap.add_argument("--codecs", default="none,lz4", help="zarr codecs to compare (preprocess.codec values)")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="bench_read_"))
    src = zarr.open_array(f"{args.store}/mni/T1w", mode="r")
    affine = np.asarray(zarr.open_group(f"{args.store}/mni", mode="r", use_consolidated=False).attrs["affine"])
    volumes = src[: args.n]
    fine_affine = affine.copy()
    fine_affine[:3, :3] /= args.upsample
    fine = np.stack([ndi.zoom(v, args.upsample, order=1) for v in volumes[: args.n // 2]]) if args.upsample > 1 else None
    for codec in args.codecs.split(","):
        compare(volumes, affine, work, f"{affine[0, 0]:g}mm", codec)
        if fine is not None:
            compare(fine, fine_affine, work, f"{fine_affine[0, 0]:g}mm", codec)
    shutil.rmtree(work)
