"""Is a planted variant's effect in a feature set at all? For each feature set and each planted causal
variant of the phantom: the smallest p of the per-dimension scan (what `gwas` tests), and the p of a
joint test of the variant against all dimensions at once.

The joint test is MultiPhen's reverse regression (O'Reilly et al. 2012, PLoS One 7:e34861) with a
linear link: after regressing the covariates out of the dosage and of every dimension, the dosage is
regressed on the k dimensions and the F test asks whether any linear combination of them carries the
variant. It assumes n > k + covariates and roughly normal residuals; its p is the ceiling of what any
per-dimension rotation of the feature set (ICA, varimax, a sparser latent) could reach.

Beside the pipeline's feature sets it scores the best linear k-dimensional code of the same input the
autoencoder reads: the first k principal components of the log-Jacobian maps (train.resolution_mm,
covariates regressed out). An autoencoder trained on reconstruction error keeps what PCA keeps, the
largest variance, so if those k components do not carry a planted effect, no such latent will.

Reads a finished `dvc repro` (stores/gwas/<set>/cohort, the volume store, data/phantom/ground_truth)
from the repository root; plink2 extracts the planted variants' dosages.

    python benchmarks/latent_information.py [--root .] [--sets atlas_regions ae_t1 ae_t1_random cnn3d_t1] [--pcs 128]
"""

import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from _common import machine
from endopheno.params import load_params
from endopheno.volumes.preprocess import open_mni


def residualise(a: np.ndarray, covariates: np.ndarray) -> np.ndarray:
    return a - covariates @ np.linalg.lstsq(covariates, a, rcond=None)[0]


def tests(dosage: np.ndarray, phenotypes: np.ndarray, covariates: np.ndarray) -> tuple[float, float]:
    """(smallest per-dimension p, joint F-test p) of one variant against the columns of `phenotypes`."""
    ok = ~np.isnan(dosage)
    c = covariates[ok]
    g = residualise(dosage[ok], c)
    y = residualise(phenotypes[ok], c)
    n, k = y.shape
    df = n - c.shape[1] - 1
    r = (y * g[:, None]).sum(0) / np.sqrt((y ** 2).sum(0) * (g ** 2).sum(0))
    per_dim = 2 * stats.t.sf(np.abs(r) * np.sqrt(df / (1 - r ** 2)), df)
    fitted = y @ np.linalg.lstsq(y, g, rcond=None)[0]
    r2 = (fitted ** 2).sum() / (g ** 2).sum()
    df_joint = n - c.shape[1] - k
    joint = stats.f.sf(r2 / k / ((1 - r2) / df_joint), k, df_joint)
    return float(per_dim.min()), float(joint)


def logjac_pcs(root: Path, subjects: list[str], covariates: np.ndarray, k: int) -> np.ndarray:
    train = load_params("train", root / "params.yaml")
    ds = open_mni(root / train["store"])
    index = {s: i for i, s in enumerate(ds.subject.values.tolist())}
    maps = np.nan_to_num(ds["logjac"].values[[index[s] for s in subjects]])
    factor = round(train["resolution_mm"] / float(ds.x.values[1] - ds.x.values[0]))
    pooled = torch.nn.functional.avg_pool3d(torch.from_numpy(maps)[:, None], factor, ceil_mode=True)
    x = pooled.reshape(len(subjects), -1).double().numpy()
    x = residualise(x[:, x.std(0) > 0], covariates)
    u, _, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
    return u[:, :k]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--sets", nargs="+", default=["atlas_regions", "ae_t1", "ae_t1_random", "cnn3d_t1"])
    ap.add_argument("--pcs", type=int, default=128)
    a = ap.parse_args()
    root = a.root
    truth = pd.read_csv(root / load_params("phantom", root / "params.yaml")["out"] / "ground_truth" / "causal_variants.tsv", sep="\t")
    source = load_params("genotypes", root / "params.yaml")["source"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "ids").write_text("\n".join(truth["id"]) + "\n")
        subprocess.run(["plink2", "--bfile", str(root / source), "--extract", f"{tmp}/ids", "--export", "A",
                        "--out", f"{tmp}/causal"], check=True, capture_output=True)
        raw = pd.read_csv(f"{tmp}/causal.raw", sep=r"\s+").set_index("IID")
    dosage_columns = {v: next(c for c in raw.columns if c.startswith(f"{v}_")) for v in truth["id"]}

    rows = []
    for name in [*a.sets, f"PCA{a.pcs}"]:
        cohort = root / "stores" / "gwas" / (a.sets[0] if name.startswith("PCA") else name) / "cohort"
        covar = pd.read_csv(cohort / "covar.tsv", sep="\t").set_index("IID").drop(columns="FID")
        pheno = pd.read_csv(cohort / "pheno.tsv", sep="\t").set_index("IID").drop(columns="FID")
        subjects = [s for s in pheno.index if s in covar.index and s in raw.index]
        c = pd.get_dummies(covar.loc[subjects], drop_first=True).astype(float).to_numpy()
        c = np.column_stack([np.ones(len(subjects)), c])
        if name.startswith("PCA"):
            y, label = logjac_pcs(root, subjects, c, a.pcs), f"first {a.pcs} PCs of log J (the best linear {a.pcs}-dim code)"
        else:
            y = pheno.loc[subjects].to_numpy(float)
            y, label = y[:, np.nanstd(y, 0) > 0], f"{name} ({y.shape[1]} dims)"
        y = np.where(np.isnan(y), np.nanmean(y, 0), y)  # rare missing feature values: the mean (this is a ceiling estimate)
        cells = []
        for _, v in truth.iterrows():
            best, joint = tests(raw.loc[subjects, dosage_columns[v["id"]]].to_numpy(float), y, c)
            cells.append(f"{best:.0e} / {joint:.0e}")
        rows.append((label, cells))
        print(label, cells, flush=True)

    print(f"\n{machine()}; n = {len(subjects)}; cell: smallest per-dimension p / joint F-test p\n")
    print("| feature set | " + " | ".join(truth["region"]) + " |")
    print("| --- |" + " --- |" * len(truth))
    for label, cells in rows:
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
