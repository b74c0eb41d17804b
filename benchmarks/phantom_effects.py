"""Effect sizes measured on a generated phantom's truth, against what params.yaml planted.

    python benchmarks/phantom_effects.py [--phantom data/phantom]

Per region, OLS of the log true volume (ground_truth/subjects.tsv) on diagnosis, age and sex, once
corrected for head size (log volume - 3 log head_scale: the anatomical effects alone) and once not
(what a GWAS with diagnosis, age and sex as covariates sees). For each planted variant, the share of
that residual variance its genotype explains (planted: `variance_explained`). Also the ceiling of AD vs
CN classification: a logistic regression on the true log volumes (with age and sex, and as an image
model sees them: relative to head size, without age), 5-fold CV.
"""

import argparse
import warnings

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def ols(y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    design = np.c_[np.ones(len(y)), x]
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    return beta, y - design @ beta


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--phantom", default="data/phantom")
    a = ap.parse_args()
    t = pd.read_csv(f"{a.phantom}/ground_truth/subjects.tsv", sep="\t")
    causal = pd.read_csv(f"{a.phantom}/ground_truth/causal_variants.tsv", sep="\t")
    covariates = np.c_[t.diagnosis == "AD", t.age, t.sex == "M"].astype(float)
    regions = [c.removeprefix("volume_") for c in t.columns if c.startswith("volume_")]
    print(f"{len(t)} subjects, {(t.diagnosis == 'AD').mean():.1%} AD\n")
    print("| region | AD vs CN | per year of age | residual SD (head size corrected) | residual SD (diagnosis, age, sex only) |")
    print("| --- | --- | --- | --- | --- |")
    for r in regions:
        log_v = np.log(t[f"volume_{r}"].to_numpy())
        beta, res = ols(log_v - 3 * np.log(t.head_scale.to_numpy()), covariates)
        _, seen = ols(log_v, covariates)
        print(f"| {r} | {np.expm1(beta[1]):+.1%} | {np.expm1(beta[2]):+.2%} | {res.std(ddof=4):.1%} | {seen.std(ddof=4):.1%} |")

    # The planted variants' dosages are not in the truth tables (the genotypes are the pipeline's input);
    # read them from the PLINK files with bed-reader, as an analysis would.
    from bed_reader import open_bed

    bed = open_bed(f"{a.phantom}/genotypes/phantom.bed", count_A1=True)
    sid = list(bed.sid)
    iid = pd.Index(bed.iid)
    print("\n| planted variant | region | variance_explained planted | share of residual variance measured |")
    print("| --- | --- | --- | --- |")
    for row in causal.itertuples():
        dose = bed.read(index=np.s_[:, sid.index(row.id)])[:, 0]
        on = t.subject_id.isin(iid).to_numpy()
        d = pd.Series(dose, index=iid).loc[t.subject_id[on]].to_numpy()
        ok = np.isfinite(d)
        _, seen = ols(np.log(t[f"volume_{row.region}"].to_numpy()[on][ok]), covariates[on][ok])
        r = np.corrcoef(seen, d[ok])[0, 1]
        print(f"| {row.id} | {row.region} | {row.variance_explained:.2f} | {r * r:.3f} |")

    y = (t.diagnosis == "AD").to_numpy()
    log_volumes = np.log(t[[f"volume_{r}" for r in regions]].to_numpy())
    designs = {"true volumes, age and sex": np.c_[log_volumes, t.age, t.sex == "M"],
               # what an affinely registered image shows: volumes relative to head size, no age
               "true volumes / head size³ only": log_volumes - 3 * np.log(t.head_scale.to_numpy())[:, None]}
    for name, x in designs.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)), x.astype(float), y,
                                  cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba")[:, 1]
        print(f"AD vs CN from the {name} (logistic, 5-fold CV): balanced accuracy "
              f"{balanced_accuracy_score(y, p >= 0.5):.3f}, ROC AUC {roc_auc_score(y, p):.3f}")
