"""How well the preprocessed maps measure the phantom's true region volumes.

    python benchmarks/morphometry_phantom.py [--store stores/volumes.zarr] [--phantom data/phantom]
    python benchmarks/morphometry_phantom.py --subjects 60 --levels 4 --levels 4,2:100,20 --levels 4,2:30,10:0.75

The second form computes the log-Jacobian maps afresh for the first N subjects with each `--levels
MM[,MM...][:ITERATIONS,...][:SMOOTHING]` setting (`preprocess.morphometry.levels_mm` / `iterations` /
`smoothing_voxels`), one process, and reports the time per subject beside the correlations, side by
side on the same subjects.

For each true region of the phantom (atlas/regions.nii.gz, on the store's grid): the mean
of each map of the MNI store (the z-scored T1 and, when present, the log-Jacobian `logjac`) inside the
region, its correlation with the true log volume relative to head size (what a template-space map can
see: the affine step removes head size), the same correlation after regressing diagnosis, age, sex and
site out of both (what a GWAS with those covariates sees: the planted variants act on this residual, so
its correlation scales the variant's t statistic), and AD vs CN from the nine region means (logistic
regression, 5-fold CV) beside the same from the true volumes (the ceiling).
"""

import argparse
import time
import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import SimpleITK as sitk
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from endopheno.mni import resample
from endopheno.volumes.morphometry import MorphometryParams, log_jacobian
from endopheno.volumes.preprocess import open_mni


def classify(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=10, max_iter=5000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = cross_val_predict(model, x, y, cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba")[:, 1]
    return balanced_accuracy_score(y, p >= 0.5), roc_auc_score(y, p)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default="stores/volumes.zarr")
    ap.add_argument("--phantom", default="data/phantom")
    ap.add_argument("--subjects", type=int, default=None, help="only the first N subjects")
    ap.add_argument("--levels", action="append", default=[], help="MM[,MM...][:ITERATIONS,...]: compute log J afresh")
    a = ap.parse_args()
    ds = open_mni(a.store)
    if a.subjects:
        ds = ds.isel(subject=slice(0, a.subjects))
    affine = np.asarray(ds.attrs["affine"])
    labels_img = nib.load(f"{a.phantom}/atlas/regions.nii.gz")
    labels = resample(np.asarray(labels_img.dataobj, np.float32), labels_img.affine, ds.brain_mask.shape, affine, order=0)
    regions = pd.read_csv(f"{a.phantom}/ground_truth/regions.tsv", sep="\t")
    truth = pd.read_csv(f"{a.phantom}/ground_truth/subjects.tsv", sep="\t").set_index("subject_id")
    truth = truth.loc[[s.split("_ses-")[0] for s in ds.subject.values.tolist()]]
    y = (truth.diagnosis == "AD").to_numpy(int)
    true = np.log(truth[[f"volume_{r}" for r in regions.region]].to_numpy() / truth.head_scale.to_numpy()[:, None] ** 3)
    maps = [m for m in ("T1w", "logjac") if m in ds]
    means = {m: np.stack([np.asarray(ds[m].values[:, labels == lab], np.float64).mean(1) for lab in regions.label], 1)
             for m in maps}
    template, mask, t1 = ds.template.values, ds.brain_mask.values, ds.T1w.values
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # as `endopheno preprocess` runs it: one core per subject
    for setting in a.levels:
        levels, iterations, smoothing = (setting.split(":") + ["", ""])[:3]
        p = MorphometryParams(levels_mm=[float(v) for v in levels.split(",")],
                              iterations=[int(v) for v in iterations.split(",")] if iterations else [100] * len(levels.split(",")),
                              smoothing_voxels=float(smoothing) if smoothing else MorphometryParams.smoothing_voxels)
        t0 = time.perf_counter()
        logjac = np.stack([log_jacobian(v, template, mask, float(affine[0, 0]), p) for v in t1])
        name = f"log J {list(p.levels_mm)} mm, {list(p.iterations)} it., smoothing {p.smoothing_voxels:g} ({(time.perf_counter() - t0) / len(t1):.1f} s/subject)"
        means[name] = np.stack([logjac[:, labels == lab].mean(1) for lab in regions.label], 1)
        maps.append(name)
    design = np.column_stack([np.ones(len(y)), y, truth.age, truth.sex == "M", pd.get_dummies(truth.site, drop_first=True)]).astype(float)

    def residual(x: np.ndarray) -> np.ndarray:
        return x - design @ np.linalg.lstsq(design, x, rcond=None)[0]

    print(f"{len(y)} subjects; correlation of the region mean with the true log volume / head size³, "
          "raw / after diagnosis, age, sex and site\n")
    print("| region | " + " | ".join(maps) + " |\n| --- |" + " --- |" * len(maps))
    for i, r in enumerate(regions.region):
        print(f"| {r} | " + " | ".join(f"{np.corrcoef(means[m][:, i], true[:, i])[0, 1]:.2f} / "
                                       f"{np.corrcoef(residual(means[m][:, i]), residual(true[:, i]))[0, 1]:.2f}" for m in maps) + " |")
    print("\n| AD vs CN from the 9 region means (5-fold CV) | BA | AUC |\n| --- | --- | --- |")
    for m in maps:
        print(f"| {m} | {classify(means[m], y)[0]:.3f} | {classify(means[m], y)[1]:.3f} |")
    print(f"| true volumes / head size³ (ceiling) | {classify(true, y)[0]:.3f} | {classify(true, y)[1]:.3f} |")
