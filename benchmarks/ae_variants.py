"""Which autoencoder settings give a latent that finds the planted loci? A screen without the pipeline.

For each variant (a `;`-separated list of `key=value` overrides of `train.models.autoencoder3d`, as
`train_variants.py --set` takes them), trains the final model as `endopheno train` does (every subject,
the same validation split and seed, no MLflow), embeds every subject, and prints per planted causal
variant the largest |t| over the 128 dimensions at that variant, covariates of the pipeline's GWAS
regressed out (`latent_information.py`'s `best dim`, what `gwas` tests), and how many of them pass the
study-wide |t|, and the same over every variant within 500 kb of it: the pipeline counts a locus when a
clumped lead lies in that window, often a neighbour in LD with a smaller p than the planted variant's (the
count here skips the clumping; confirm a winner with `dvc repro`). `--untrained` adds each variant's untrained copy (the `ae_t1_random` baseline).

Reads a finished `dvc repro` from the repository root (the volume store, the ae_t1 cohort's covariates,
the phantom's truth):

    python benchmarks/ae_variants.py --variant "" --variant "options.parcel_width=1.0" --variant "highpass_mm=18"
"""

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from _common import machine
from latent_information import causal_dosages, residualise, t_stats
from train_variants import trainer
from endopheno.models.splits import outer_folds
from endopheno.params import load_params


def embed(tr, net, norm, scale) -> np.ndarray:
    model = tr.volume_model(net, norm, scale)
    with torch.no_grad():
        return torch.cat([model.predict(tr.volumes[i:i + 32]) for i in range(0, len(tr.volumes), 32)]).double().numpy()


def planted_windows(root: Path, kb: int = 500) -> list[tuple[str, str, pd.DataFrame]]:
    """Per planted variant: its region, its dosage column, and the dosages (by IID) of every variant within
    `kb` of it, the planted one included: the window a locus is counted in. Read once, for every variant."""
    causal, _ = causal_dosages(root)
    source = load_params("genotypes", root / "params.yaml")["source"]
    windows = []
    with tempfile.TemporaryDirectory() as tmp:
        for _, v in causal.iterrows():
            subprocess.run(["plink2", "--bfile", str(root / source), "--chr", str(v["chrom"]), "--from-bp",
                            str(max(int(v["pos"]) - kb * 1000, 1)), "--to-bp", str(int(v["pos"]) + kb * 1000),
                            "--export", "A", "--out", f"{tmp}/w"], check=True, capture_output=True)
            windows.append((v["region"], v["column"], pd.read_csv(f"{tmp}/w.raw", sep=r"\s+").set_index("IID").iloc[:, 5:]))
    return windows


def best_t(code: np.ndarray, subjects: list[str], root: Path, windows, feature_set: str = "ae_t1") -> tuple[list[float], list[float], float]:
    """Per planted variant (`planted_windows`), the largest |t| over the code's dimensions at the variant and
    over its window (what the pipeline's locus count sees); and the study-wide |t|."""
    cohort = root / "stores" / "gwas" / feature_set / "cohort"
    covar = pd.read_csv(cohort / "covar.tsv", sep="\t").set_index("IID").drop(columns="FID")
    index = {s: i for i, s in enumerate(subjects)}
    keep = [s for s in covar.index if s in index and s in windows[0][2].index]
    c = np.column_stack([np.ones(len(keep)), pd.get_dummies(covar.loc[keep], drop_first=True).astype(float).to_numpy()])
    y = code[[index[s] for s in keep]]
    y = residualise(y[:, y.std(0) > 0], c)

    def largest_t(dosage: np.ndarray) -> float:
        ok = ~np.isnan(dosage)   # a missing call leaves the subject out, as plink2 does
        if not dosage[ok].std() > 0:
            return 0.0
        return float(np.abs(t_stats(residualise(dosage[ok], c[ok]), y[ok], ok.sum() - c.shape[1] - 1)).max())

    at_variant, in_window = [], []
    for _, column, window in windows:
        window = window.loc[keep]
        at_variant.append(largest_t(window[column].to_numpy(float)))
        in_window.append(max(largest_t(window[col].to_numpy(float)) for col in window.columns))
    return at_variant, in_window, float(stats.t.isf(5e-8 / y.shape[1] / 2, len(keep) - c.shape[1] - 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", default=None, help="overrides 'key=value;key=value' ('' = params.yaml)")
    ap.add_argument("--untrained", action="store_true")
    ap.add_argument("--root", type=Path, default=Path("."))
    a = ap.parse_args()
    windows = planted_windows(a.root)
    regions = [region for region, _, _ in windows]
    rows = []
    for variant in a.variant or [""]:
        overrides = [kv for kv in variant.split(";") if kv]
        tr = trainer("autoencoder3d", load_params("train")["resolution_mm"], overrides)
        split = outer_folds(tr.data.groups, tr.data.strata, folds=1, validation_fraction=tr.p.validation_fraction,
                            seed=tr.p.seed)[0]
        seed = tr.p.seed * 1000 + 999   # the final model's seed in Trainer.final
        t0 = time.time()
        net, norm, scale, result, _ = tr.train_split(split, seed, None, variant or "params.yaml")
        minutes = (time.time() - t0) / 60
        nets = [("trained", net, f"val {result.best_loss:.3f}, epoch {result.best_epoch}, {minutes:.1f} min")]
        if a.untrained:
            nets.append(("untrained", tr.net(seed), ""))
        for kind, n, info in nets:
            t, window, threshold = best_t(embed(tr, n, norm, scale), tr.data.subjects.tolist(), a.root, windows)
            found = sum(x >= threshold for x in window)
            rows.append((f"`{variant or 'params.yaml'}` {kind}", list(zip(t, window)), threshold, found, info))
            print(rows[-1], flush=True)
    print(f"\n{machine()}; cell: largest |t| over the dimensions at the planted variant / in its 500 kb window "
          "(bold: ≥ the study-wide |t|; loci: windows above it)\n")
    print("| variant | " + " | ".join(regions) + " | loci | study-wide \\|t\\| | final model |")
    print("| --- |" + " --- |" * (len(regions) + 3))
    for label, t, threshold, found, info in rows:
        cells = [f"{x:.1f} / " + (f"**{w:.1f}**" if w >= threshold else f"{w:.1f}") for x, w in t]
        print(f"| {label} | " + " | ".join(cells) + f" | {found} | {threshold:.2f} | {info} |")


if __name__ == "__main__":
    main()
