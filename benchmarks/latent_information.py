"""Is a planted variant's effect in a feature set at all, and could any rotation of the set find it?

For each feature set and each planted causal variant of the phantom (the covariates of the pipeline's
GWAS regressed out of everything, t statistics on n - covariates - 1 degrees of freedom):

- `truth`: t of the variant on the true log volume of its region (ground_truth/subjects.tsv): the
  most any measurement of that region can reach.
- `best dim`: the largest |t| over the set's dimensions at the variant: what `endopheno gwas` tests.
- `best direction`: t on the set's best linear prediction of the true region volume, fitted by ridge
  regression on the other folds (10-fold cross-fitting) and applied to the held-out fold. It is learnt
  from the truth, which no unsupervised rotation of the set (ICA, varimax, a sparser latent) has, so it
  is a ceiling for them: if it stays below the study-wide |t|, no choice of axes of that feature set
  finds the locus at this sample size. Its cross-validated R² with the true residual volume is shown.

(An F test of the variant against all k dimensions at once would not do as that ceiling: spreading its
non-centrality over k degrees of freedom, it can miss an effect that one direction carries.)

Beside the pipeline's feature sets it scores k-dimensional codes of the same input the autoencoder
reads, the log-Jacobian maps pooled to a grid (train.resolution_mm, or each `--resolution`), covariates
regressed out, chosen by `--code` (repeatable):

- `pca` (default): the first k principal components, the best linear k-dim code for reconstruction
  error; an autoencoder trained on that error keeps what PCA keeps, the largest variance.
- `pca_z`: the same of each voxel z-scored (PCA of the correlation matrix: a voxel's weight no longer
  grows with its variance).
- `sparse_pca:ALPHA`: k sparse components of the z-scored maps (Mairal et al. 2009, MiniBatchSparsePCA;
  ALPHA the L1 penalty, larger = smaller components); the code is each subject's projection.
- `ward:K`: K parcels from Ward clustering of the z-scored voxels with the grid's neighbours as
  connectivity (a data-driven parcellation; Thirion et al. 2014, Front. Neurosci. 8:167); the code is each
  subject's mean log J per parcel. No atlas, no truth.
- `voxels`: the pooled voxels themselves (every one that varies: a grid of cubes as a parcellation; pass a
  coarse `--resolution`, e.g. 18, to keep the number of tests near k).
- `regions`: the mean log J per region of the phantom's atlas on the same grid (the atlas is the planted
  regions' definition: the code any unsupervised parcellation could at best find).

Reads a finished `dvc repro` (stores/gwas/<set>/cohort, the volume store, data/phantom/ground_truth)
from the repository root; plink2 extracts the planted variants' dosages.

    python benchmarks/latent_information.py [--root .] [--sets atlas_regions ae_t1 ae_t1_random cnn3d_t1] [--pcs 128] \
        [--resolution 6 --resolution 2] [--code pca --code pca_z --code sparse_pca:8 --code ward:128 --code regions]
"""

import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold

from _common import machine
from endopheno.params import load_params
from endopheno.volumes.preprocess import open_mni


def residualise(a: np.ndarray, covariates: np.ndarray) -> np.ndarray:
    return a - covariates @ np.linalg.lstsq(covariates, a, rcond=None)[0]


def t_stats(g: np.ndarray, y: np.ndarray, df: int) -> np.ndarray:
    """t of the residualised dosage g on each residualised column of y (the same as OLS with covariates)."""
    y = y.reshape(len(g), -1)
    r = (y * g[:, None]).sum(0) / np.sqrt((y ** 2).sum(0) * (g ** 2).sum(0))
    return r * np.sqrt(df / (1 - r ** 2))


def best_direction(features: np.ndarray, truth: np.ndarray, seed: int = 0) -> tuple[np.ndarray, float]:
    """Out-of-fold ridge prediction of `truth` from `features` (10 folds), and its R² with `truth`."""
    predicted = np.empty_like(truth)
    for train, test in KFold(10, shuffle=True, random_state=seed).split(features):
        model = RidgeCV(alphas=np.logspace(-2, 5, 30)).fit(features[train], truth[train])
        predicted[test] = model.predict(features[test])
    return predicted, 1 - ((truth - predicted) ** 2).sum() / ((truth - truth.mean()) ** 2).sum()


def causal_dosages(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The phantom's causal variants (with `column`: each one's dosage column) and their dosages by IID."""
    causal = pd.read_csv(root / load_params("phantom", root / "params.yaml")["out"] / "ground_truth" / "causal_variants.tsv", sep="\t")
    source = load_params("genotypes", root / "params.yaml")["source"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "ids").write_text("\n".join(causal["id"]) + "\n")
        subprocess.run(["plink2", "--bfile", str(root / source), "--extract", f"{tmp}/ids", "--export", "A",
                        "--out", f"{tmp}/causal"], check=True, capture_output=True)
        raw = pd.read_csv(f"{tmp}/causal.raw", sep=r"\s+").set_index("IID")
    causal["column"] = [next(c for c in raw.columns if c.startswith(f"{v}_")) for v in causal["id"]]
    return causal, raw


def pooled_logjac(root: Path, subjects: list[str], resolution_mm: float) -> tuple[np.ndarray, np.ndarray, object]:
    """Each subject's log-J map average-pooled to `resolution_mm` ([subjects, voxels], voxels that vary
    only), the kept voxels' mask on the pooled grid, and the volume store."""
    ds = open_mni(root / load_params("train", root / "params.yaml")["store"])
    index = {s: i for i, s in enumerate(ds.subject.values.tolist())}
    maps = np.nan_to_num(ds["logjac"].values[[index[s] for s in subjects]])
    factor = round(resolution_mm / float(ds.x.values[1] - ds.x.values[0]))
    pooled = torch.nn.functional.avg_pool3d(torch.from_numpy(maps)[:, None], factor, ceil_mode=True)[:, 0]
    x = pooled.reshape(len(subjects), -1).double().numpy()
    keep = x.std(0) > 0
    return x[:, keep], keep.reshape(pooled.shape[1:]), ds


def logjac_code(kind: str, root: Path, subjects: list[str], covariates: np.ndarray, k: int, resolution_mm: float) -> np.ndarray:
    """[subjects, dims]: the code `kind` (see the module's docstring) of the pooled log-J maps."""
    x, keep, ds = pooled_logjac(root, subjects, resolution_mm)
    residual = residualise(x, covariates)
    z = residual / residual.std(0)
    name, _, arg = kind.partition(":")
    if name == "voxels":
        return x
    if name in ("pca", "pca_z"):
        # the covariates (with an intercept) are regressed out: the columns are centred already
        u, _, _ = np.linalg.svd(residual if name == "pca" else z, full_matrices=False)
        return u[:, :k]
    if name == "sparse_pca":
        from sklearn.decomposition import MiniBatchSparsePCA

        return MiniBatchSparsePCA(n_components=k, alpha=float(arg), batch_size=50, max_iter=50, random_state=0).fit_transform(z)
    if name in ("ward", "regions"):
        if name == "ward":
            from sklearn.cluster import FeatureAgglomeration
            from sklearn.feature_extraction.image import grid_to_graph

            connectivity = grid_to_graph(*keep.shape, mask=keep)
            labels = FeatureAgglomeration(n_clusters=int(arg), connectivity=connectivity, linkage="ward").fit(z).labels_
            weights = np.eye(int(arg))[labels].T                           # [parcels, voxels]
        else:
            from endopheno.featurestore.atlas import atlas_from_files

            atlas_params = load_params("features", root / "params.yaml")["atlas"]
            atlas = atlas_from_files(root / atlas_params["labels"], root / atlas_params["table"], ds.brain_mask.shape,
                                     np.asarray(ds.attrs["affine"]))
            factor = round(resolution_mm / float(ds.x.values[1] - ds.x.values[0]))
            one_hot = torch.from_numpy(np.stack([atlas.labels == i for i in range(1, len(atlas.names) + 1)]).astype(float))
            share = torch.nn.functional.avg_pool3d(one_hot[:, None], factor, ceil_mode=True)[:, 0].numpy()
            weights = share.reshape(len(atlas.names), -1)[:, keep.ravel()]  # each pooled voxel's share of the region
        return x @ (weights / weights.sum(1, keepdims=True)).T
    raise SystemExit(f"--code {kind}: not one of pca, pca_z, sparse_pca:ALPHA, ward:K, voxels, regions")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--sets", nargs="+", default=["atlas_regions", "ae_t1", "ae_t1_random", "cnn3d_t1"])
    ap.add_argument("--pcs", type=int, default=128)
    ap.add_argument("--resolution", type=float, action="append",
                    help="grid (mm) of the image codes, repeatable (default train.resolution_mm): would a finer autoencoder hold more?")
    ap.add_argument("--code", action="append", help="image code, repeatable: pca (default), pca_z, sparse_pca:ALPHA, ward:K, voxels, regions")
    a = ap.parse_args()
    root = a.root
    volumes = pd.read_csv(root / load_params("phantom", root / "params.yaml")["out"] / "ground_truth" / "subjects.tsv",
                          sep="\t").set_index("subject_id")
    causal, raw = causal_dosages(root)

    rows = []
    resolutions = a.resolution or [load_params("train", root / "params.yaml")["resolution_mm"]]
    codes = [(kind, mm) for mm in resolutions for kind in a.code or ["pca"]]
    # (feature set, None) for each set, then (None, (code, grid)) for each image code, on the first set's cohort
    for name, code in [*((s, None) for s in a.sets), *((None, code) for code in codes)]:
        cohort = root / "stores" / "gwas" / (name or a.sets[0]) / "cohort"
        covar = pd.read_csv(cohort / "covar.tsv", sep="\t").set_index("IID").drop(columns="FID")
        pheno = pd.read_csv(cohort / "pheno.tsv", sep="\t").set_index("IID").drop(columns="FID")
        subjects = [s for s in pheno.index if s in covar.index and s in raw.index]
        c = pd.get_dummies(covar.loc[subjects], drop_first=True).astype(float).to_numpy()
        c = np.column_stack([np.ones(len(subjects)), c])
        if code is not None:
            y = logjac_code(code[0], root, subjects, c, a.pcs, code[1])
            label = f"log J at {code[1]:g} mm, {code[0]} ({y.shape[1]} dims)"
        else:
            y = pheno.loc[subjects].to_numpy(float)
            y, label = y[:, np.nanstd(y, 0) > 0], f"{name} ({y.shape[1]} dims)"
        y = np.where(np.isnan(y), np.nanmean(y, 0), y)  # rare missing feature values: the mean
        y = residualise(y, c)
        df = len(subjects) - c.shape[1] - 1
        threshold = stats.t.isf(5e-8 / y.shape[1] / 2, df)
        cells = []
        for _, v in causal.iterrows():
            dosage = raw.loc[subjects, v["column"]].to_numpy(float)
            ok = ~np.isnan(dosage)  # a missing call: the subject is left out, as plink2 does
            g = residualise(dosage[ok], c[ok])
            true = residualise(np.log(volumes.loc[subjects, f"volume_{v['region']}"].to_numpy())[ok], c[ok])
            predicted, r2 = best_direction(y[ok], true)
            t_truth = t_stats(g, true, df)[0]
            t_dim = np.abs(t_stats(g, y[ok], df)).max()
            t_best = t_stats(g, residualise(predicted, c[ok]), df)[0]
            cells.append(f"{abs(t_truth):.1f} / {t_dim:.1f} / {abs(t_best):.1f} ({r2:.2f})")
        rows.append((f"{label}: |t| ≥ {threshold:.2f}", cells))
        print(rows[-1], flush=True)

    print(f"\n{machine()}; n = {len(subjects)}; cell: |t| truth / best dimension / best direction (its R² with the true residual volume)\n")
    print("| feature set: study-wide | " + " | ".join(causal["region"]) + " |")
    print("| --- |" + " --- |" * len(causal))
    for label, cells in rows:
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
