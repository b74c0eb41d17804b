"""Accuracy of preprocessing against the phantom's truth: for each subject, the mean displacement
(over the template brain mask) between the recovered template->scanner affine and the true one.

    python benchmarks/preprocess_accuracy.py [--store stores/volumes.zarr] [--truth data/phantom/ground_truth]
"""

import argparse
import json
from pathlib import Path

import numpy as np
import xarray as xr

from endopheno.volumes.qc import mean_displacement

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
    recovered = ds["template_to_native"].values
    errors = np.array([mean_displacement(recovered[i], np.asarray(truth[str(s)]["template_to_scanner"]), mask, affine)
                       for i, s in enumerate(ds["subject"].values)])
    qc = ds["qc_pass"].values
    print(f"{len(errors)} subjects, output voxel {voxel} mm")
    print(f"mean displacement error: median {np.median(errors):.2f} mm, 95th percentile {np.percentile(errors, 95):.2f} mm, max {errors.max():.2f} mm")
    print(f"below one output voxel ({voxel} mm): {100 * np.mean(errors < voxel):.1f}% of subjects")
    print(f"QC flagged: {int((~qc).sum())}; of those above one voxel, flagged: {int((~qc & (errors >= voxel)).sum())}/{int((errors >= voxel).sum())}")
    worst = np.argsort(errors)[::-1][:5]
    print("worst:", ", ".join(f"{ds['subject'].values[i]} {errors[i]:.2f} mm (r={ds['qc_correlation'].values[i]:.3f})" for i in worst))
