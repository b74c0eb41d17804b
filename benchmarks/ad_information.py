"""How well can AD be told from CN on the phantom at all? Cross-validated balanced accuracy of an L2
logistic regression (C chosen by inner CV) on what each stage of the chain knows about the planted
regions: their true volumes (ground truth, relative to head size³), and the atlas set's measurements of
the same regions from the MNI store (tensor-based morphometry volumes, grey-matter volumes, mean T1).
It bounds what a classifier of the maps can reach: the true volumes are what the phantom's AD changes,
the TBM volumes are what survives preprocessing when the classifier is told where the regions are.

Reads a finished `dvc repro` from the repository root (data/phantom/ground_truth/subjects.tsv, the
gwas stage's exported atlas cohort).

    python benchmarks/ad_information.py [--root .] [--folds 5]
"""

import argparse
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from _common import machine
from endopheno.params import load_params


def balanced_accuracy(x: np.ndarray, ad: np.ndarray, folds: int) -> tuple[float, float]:
    """Mean and SD over the outer folds."""
    model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=10, max_iter=5000))
    split = StratifiedKFold(folds, shuffle=True, random_state=0)
    predicted = cross_val_predict(model, x, ad, cv=split)
    per_fold = [balanced_accuracy_score(ad[test], predicted[test]) for _, test in split.split(x, ad)]
    return float(np.mean(per_fold)), float(np.std(per_fold))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--folds", type=int, default=5)
    a = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # scikit-learn's announced default changes
    truth = pd.read_csv(a.root / load_params("phantom", a.root / "params.yaml")["out"] / "ground_truth" / "subjects.tsv",
                        sep="\t").set_index("subject_id")
    atlas = pd.read_csv(a.root / "stores" / "gwas" / "atlas_regions" / "cohort" / "pheno.tsv", sep="\t").set_index("IID")
    subjects = [s for s in atlas.index if s in truth.index]
    truth, atlas = truth.loc[subjects], atlas.loc[subjects]
    ad = (truth["diagnosis"] == "AD").to_numpy(int)
    volumes = [c for c in truth.columns if c.startswith("volume_")]
    relative = np.log(truth[volumes].to_numpy() / truth[["head_scale"]].to_numpy() ** 3)
    rows = {
        f"true volumes of the {len(volumes)} planted regions / head size³": relative,
        "same + age": np.column_stack([relative, truth["age"]]),
    }
    for kind, what in (("tbm_volume_mm3", "TBM volumes"), ("volume_mm3", "grey-matter volumes"), ("mean_t1", "mean T1")):
        columns = [c for c in atlas.columns if c.endswith("_" + kind) and (kind != "volume_mm3" or "_tbm_" not in c)]
        rows[f"atlas set: {what} ({len(columns)} regions incl. whole brain)"] = atlas[columns].to_numpy(float)
        if kind == "tbm_volume_mm3":   # what an age-corrected map holds (train.models.NAME.covariates)
            rows["the same + age"] = np.column_stack([atlas[columns].to_numpy(float), truth["age"]])
    rows["age alone (does age itself tell AD from CN?)"] = truth[["age"]].to_numpy(float)
    print(f"{machine()}; n = {len(subjects)} ({ad.sum()} AD); logistic regression, {a.folds} folds\n")
    print("| features | balanced accuracy (mean ± SD over folds) |\n| --- | --- |")
    for name, x in rows.items():
        mean, sd = balanced_accuracy(x, ad, a.folds)
        print(f"| {name} | {mean:.3f} ± {sd:.3f} |", flush=True)


if __name__ == "__main__":
    main()
