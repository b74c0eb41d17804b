"""Accuracy of preprocessing against the phantom's truth: for each subject, the mean displacement
(over the template brain mask) between the recovered template->scanner affine and the true one.

    python benchmarks/preprocess_accuracy.py [--store stores/volumes.zarr] [--truth data/phantom/ground_truth]
"""

import argparse
import json
from pathlib import Path

import numpy as np
import xarray as xr

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default="stores/volumes.zarr")
    ap.add_argument("--truth", default="data/phantom/ground_truth")
    args = ap.parse_args()
    ds = xr.open_zarr(args.store, group="mni")
    truth = json.loads((Path(args.truth) / "acquisition.json").read_text())
    mask = ds["brain_mask"].values
    affine = np.asarray(ds.attrs["affine"])
    voxel = float(ds.attrs["preprocess"]["voxel_size_mm"])
    pts = affine[:3, :3] @ np.argwhere(mask).T + affine[:3, 3:4]
    pts = np.vstack([pts, np.ones(pts.shape[1])])
    errors = []
    for i, subject in enumerate(str(s) for s in ds["subject"].values):
        a, b = ds["template_to_native"].values[i], np.asarray(truth[subject]["template_to_scanner"])
        errors.append(float(np.linalg.norm((a @ pts - b @ pts)[:3], axis=0).mean()))
    errors = np.array(errors)
    qc = ds["qc_pass"].values
    print(f"{len(errors)} subjects, output voxel {voxel} mm")
    print(f"mean displacement error: median {np.median(errors):.2f} mm, 95th percentile {np.percentile(errors, 95):.2f} mm, max {errors.max():.2f} mm")
    print(f"below one output voxel ({voxel} mm): {100 * np.mean(errors < voxel):.1f}% of subjects")
    print(f"QC flagged: {int((~qc).sum())}; of those above one voxel, flagged: {int((~qc & (errors >= voxel)).sum())}/{int((errors >= voxel).sum())}")
    worst = np.argsort(errors)[::-1][:5]
    print("worst:", ", ".join(f"{ds['subject'].values[i]} {errors[i]:.2f} mm (r={ds['qc_correlation'].values[i]:.3f})" for i in worst))
