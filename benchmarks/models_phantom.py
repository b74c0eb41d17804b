"""Validation of the trained models on the phantom's truth (issue 5's targets), from the registry.

    python benchmarks/models_phantom.py [--models cnn3d autoencoder3d ...] [--phantom data/phantom]

For every model: its champion version's cross-validated test metrics (mean ± SD over the held-out
folds) beside its baseline, and the training and loader throughput, as logged by `endopheno train`.
For the autoencoder: how well its latent (feature set ae_t1) and the untrained baseline's latent
(ae_t1_random) predict the true hippocampal volume (left + right, ground_truth/subjects.tsv; the
pipeline never reads it) by cross-validated ridge regression: R² over 5 folds, regularisation chosen
inside each training fold (RidgeCV). Prints the Markdown tables for BENCHMARKS.md.
"""

import argparse

import mlflow
import numpy as np
import pandas as pd
from deltalake import DeltaTable
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from _common import machine

from endopheno.models.train import REGISTRY_PREFIX

BASELINE = {"classification": "linear SVM on voxels", "regression": "linear SVR on voxels",
            "reconstruction": "untrained autoencoder"}


def model_rows(names: list[str]) -> list[str]:
    client = mlflow.MlflowClient()
    rows = []
    for name in names:
        try:
            version = client.get_model_version_by_alias(REGISTRY_PREFIX + name, "champion")
        except mlflow.exceptions.MlflowException:
            print(f"{name}: not registered (run `endopheno train {name}`)")
            continue
        run = client.get_run(version.tags["training_run"])
        m, task = run.data.metrics, version.tags["task"]
        metrics = {"classification": ["balanced_accuracy", "auc"], "regression": ["mae", "r"],
                   "reconstruction": ["masked_mse", "correlation"]}[task]
        cells = [f"{m[f'{k}_mean']:.3f} ± {m[f'{k}_sd']:.3f}" for k in metrics]
        base = [f"{m[f'baseline_{k}_mean']:.3f} ± {m[f'baseline_{k}_sd']:.3f}" for k in metrics]
        rows.append(f"| `{name}` v{version.version} | {task} | {', '.join(metrics)} | {' / '.join(cells)} | "
                    f"{BASELINE[task]}: {' / '.join(base)} | {m.get('train_volumes_per_s_mean', float('nan')):.1f} | "
                    f"{m.get('loader_volumes_per_s', float('nan')):.1f} | {run.data.params.get('folds')} |")
    return rows


def latent_r2(feature_set: str, store: str, truth: pd.DataFrame, target: str, seed: int = 0) -> float:
    table = DeltaTable(f"{store}/{feature_set}").to_pandas()
    table = table.merge(truth, on="subject_id")
    x = table[[c for c in table.columns if c.startswith("f") and c[1:].isdigit()]].to_numpy()
    y = table[target].to_numpy()
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 5, 30)))
    predicted = cross_val_predict(model, x, y, cv=KFold(5, shuffle=True, random_state=seed))
    return 1 - ((y - predicted) ** 2).sum() / ((y - y.mean()) ** 2).sum()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=["cnn3d", "patch27", "slice2d", "inception3d", "inception_resnet3d",
                                                    "brainage", "autoencoder3d"])
    ap.add_argument("--phantom", default="data/phantom")
    ap.add_argument("--features", default="stores/features")
    ap.add_argument("--tracking-uri", default="sqlite:///stores/mlflow.db")
    a = ap.parse_args()
    mlflow.set_tracking_uri(a.tracking_uri)
    print(f"machine: {machine()}\n")
    print("| model | task | metrics | held-out folds (mean ± SD) | baseline (same folds) | train vol/s | loader vol/s | folds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(model_rows(a.models)))
    truth = pd.read_csv(f"{a.phantom}/ground_truth/subjects.tsv", sep="\t")
    # Both the volume in mm³ and relative to head size (÷ head_scale³): a latent of template-space maps
    # never sees head size, which the affine registration removes (in a study it is a covariate, as ICV).
    volume = truth.volume_hippocampus_L + truth.volume_hippocampus_R
    truth = pd.DataFrame({"subject_id": truth.subject_id, "hippocampus": volume, "relative": volume / truth.head_scale ** 3})
    print("\n| latent | R² of true hippocampal volume (5-fold CV ridge) | R² of the same relative to head size³ |\n| --- | --- | --- |")
    for feature_set in ("ae_t1", "ae_t1_random"):
        try:
            print(f"| `{feature_set}` | {latent_r2(feature_set, a.features, truth, 'hippocampus'):.3f} | "
                  f"{latent_r2(feature_set, a.features, truth, 'relative'):.3f} |")
        except Exception as e:  # noqa: BLE001 - a set not extracted yet is reported, the others still print
            print(f"| `{feature_set}` | not available ({type(e).__name__}: {e}) |")
