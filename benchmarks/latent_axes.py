"""Which axes of a latent put a planted effect into one dimension? For one version of a deep feature set:
the largest |t| over its dimensions at each planted variant of the phantom, with the dimensions as
extracted, after varimax rotations from several starts, and after spatial ICA (models/basis.py) from
two seeds. Both act on the whitened latent's activation patterns over the 6 mm log-Jacobian voxels,
with the pipeline's GWAS covariates regressed out of latent, maps and dosages.

Reads a finished `dvc repro` from the repository root (the catalog, the GWAS cohort of the set, the
volume store, the phantom's causal variants; plink2 extracts their dosages).

    python benchmarks/latent_axes.py [--root .] [--set ae_t1] [--version 0] [--starts 4]
"""

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from _common import machine
from latent_information import causal_dosages, residualise, t_stats
from endopheno.featurestore.catalog import connect
from endopheno.models.basis import independent_components
from endopheno.params import load_params
from endopheno.volumes.preprocess import open_mni


def varimax(loadings: np.ndarray, iterations: int = 500, tol: float = 1e-8) -> np.ndarray:
    """Kaiser's varimax rotation of `loadings` (p × k), by R's `stats::varimax` iteration (no row normalisation)."""
    rotation, criterion = np.eye(loadings.shape[1]), 0.0
    for _ in range(iterations):
        rotated = loadings @ rotation
        u, s, vt = np.linalg.svd(loadings.T @ (rotated ** 3 - rotated * (rotated ** 2).mean(0)))
        rotation, previous, criterion = u @ vt, criterion, s.sum()
        if previous and criterion < previous * (1 + tol):
            break
    return rotation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--set", default="ae_t1")
    ap.add_argument("--version", type=int, default=None, help="feature-set version (default: the latest)")
    ap.add_argument("--starts", type=int, default=4, help="random varimax starts besides the latent's own axes")
    a = ap.parse_args()
    root = a.root
    causal, raw = causal_dosages(root)
    cohort = root / "stores" / "gwas" / a.set / "cohort"
    covar = pd.read_csv(cohort / "covar.tsv", sep="\t").set_index("IID").drop(columns="FID")
    subjects = [s for s in covar.index if s in raw.index]
    c = np.column_stack([np.ones(len(subjects)), pd.get_dummies(covar.loc[subjects], drop_first=True).astype(float).to_numpy()])
    df = len(subjects) - c.shape[1] - 1

    con = connect(root / load_params("catalog", root / "params.yaml")["path"])
    view = f"{a.set}_v{a.version}" if a.version is not None else a.set
    table = con.sql(f'SELECT * FROM features."{view}"').df().set_index("subject_id").loc[subjects]
    z = residualise(table.filter(regex=r"^f\d+$").to_numpy(float), c)

    train = load_params("train", root / "params.yaml")
    ds = open_mni(root / train["store"])
    index = {s: i for i, s in enumerate(ds.subject.values.tolist())}
    maps = np.nan_to_num(ds["logjac"].values[[index[s] for s in subjects]])
    factor = round(train["resolution_mm"] / float(ds.x.values[1] - ds.x.values[0]))
    x = torch.nn.functional.avg_pool3d(torch.from_numpy(maps)[:, None], factor, ceil_mode=True).reshape(len(subjects), -1)
    x = residualise(x.double().numpy(), c)
    x = x[:, x.std(0) > 0]

    def best(features: np.ndarray) -> list[float]:
        out = []
        for v in causal.itertuples():
            g = raw.loc[subjects, v.column].to_numpy(float)
            ok = ~np.isnan(g)
            out.append(float(np.abs(t_stats(residualise(g[ok], c[ok]), residualise(features[ok], c[ok]), df)).max()))
        return out

    u, s, _ = np.linalg.svd(z - z.mean(0), full_matrices=False)
    whitened = u * np.sqrt(len(z) - 1)
    patterns = x.T @ whitened / (len(z) - 1)
    rows = [("as extracted", best(z))]
    rng = np.random.default_rng(0)
    for start in range(a.starts + 1):
        q = np.eye(z.shape[1]) if start == 0 else np.linalg.qr(rng.normal(size=(z.shape[1],) * 2))[0]
        t0 = time.perf_counter()
        r = q @ varimax(patterns @ q)
        criterion = ((patterns @ r) ** 2).var(0).sum()
        rows.append((f"varimax, start {'own axes' if start == 0 else f'random {start}'} (criterion {criterion:.8f}, "
                     f"{time.perf_counter() - t0:.0f} s)", best(whitened @ r)))
    for seed in (0, 1):
        t0 = time.perf_counter()
        mean, transform = independent_components(z, x, seed=seed)
        rows.append((f"spatial ICA, seed {seed} ({time.perf_counter() - t0:.0f} s)", best((z - mean) @ transform)))
        print(rows[-1], flush=True)

    threshold = stats.t.isf(5e-8 / z.shape[1] / 2, df)
    print(f"\n{machine()}; {view}, n = {len(subjects)}; largest |t| over dimensions (study-wide {threshold:.2f})\n")
    print("| axes | " + " | ".join(causal["region"]) + " |")
    print("| --- |" + " --- |" * len(causal))
    for label, ts in rows:
        print(f"| {label} | " + " | ".join(f"{t:.1f}" for t in ts) + " |")


if __name__ == "__main__":
    main()
