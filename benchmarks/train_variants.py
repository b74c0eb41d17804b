"""Quick comparisons of training settings on a few outer folds, without MLflow or the registry.

    python benchmarks/train_variants.py cnn3d --res 6 --folds 0,1 --set learning_rate=3.0e-4 --set batch_size=16
    python benchmarks/train_variants.py cnn3d --res 6 --set augment.affine_prob=0.5 --set augment.noise_sd=0.05
    python benchmarks/train_variants.py cnn3d --svm-only --res 4 --res 6 --res 8

Trains the model of params.yaml `train.models` with `--set key=value` overrides (`options.*`,
`augment.*`, `in_memory`, `loader_workers`, `threads`, or any model key) on the given outer folds of `endopheno
train` (same seed, same subjects) and prints per fold the test balanced accuracy / AUC, the best epoch
and the validation-loss curve, beside the linear SVM baseline. `--svm-only` prints the baseline at each
resolution. Compare variants in one session: the machine is noisy.
"""

import argparse
import json
import time

import numpy as np
import yaml

from endopheno.models.splits import outer_folds
from endopheno.models.train import Trainer, linear_baseline, load_train_params, model_spec
from endopheno.params import load_params


def trainer(model: str, res: float, overrides: list[str]) -> Trainer:
    params = load_params("train")
    params.update(resolution_mm=res, tracking_uri=None)
    spec = params["models"][model]
    for kv in overrides:
        key, value = kv.split("=", 1)
        value = yaml.safe_load(value)
        group, _, sub = key.partition(".")
        if group in ("options", "augment") and sub:
            spec[group] = {**(spec.get(group) or {}), sub: value}
        elif key in ("in_memory", "loader_workers", "threads", "seed"):
            params[key] = value
        else:
            spec[key] = value
    p = load_train_params(params)
    return Trainer(p, model_spec(p, model))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--res", type=float, action="append")
    ap.add_argument("--folds", default="0,1,2,3,4")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--svm-only", action="store_true")
    a = ap.parse_args()
    for res in a.res or [6.0]:
        tr = trainer(a.model, res, a.set)
        p, spec = tr.p, tr.spec
        splits = outer_folds(tr.data.groups, tr.data.strata, folds=p.folds, validation_fraction=p.validation_fraction, seed=p.seed)
        voxels = tr.volumes[:, 0][:, tr.mask].numpy()
        results = []
        for fold in map(int, a.folds.split(",")):
            s = splits[fold]
            line = {"res_mm": res, "grid": tr.shape, "fold": fold}
            if not a.svm_only:
                t0 = time.time()
                net, norm, scale, result, info = tr.train_split(s, p.seed * 1000 + fold, None, f"fold {fold}")
                test = tr.loader(s.test, norm, scale, shuffle=False, seed=0)
                line.update(**{k: round(v, 3) for k, v in tr.test_scores(net, test, scale, tr.data.target[s.test]).items()},
                            best_epoch=result.best_epoch, restarts=info["restarts"], minutes=round((time.time() - t0) / 60, 2),
                            val_loss=[round(h["val_loss"], 3) for h in result.history])
            if spec.task != "reconstruction":
                base = linear_baseline(spec.task, voxels, tr.data.target, s, p.svm_c)
                line["baseline"] = {k: round(v, 3) for k, v in base.items()}
            results.append(line)
            print(json.dumps(line), flush=True)
        key = "baseline" if a.svm_only else next(k for k in results[0] if k not in ("res_mm", "grid", "fold"))
        values = [r[key][next(iter(r[key]))] if a.svm_only else r[key] for r in results]
        print(f"mean {key} at {res:g} mm: {np.mean(values):.3f} ({', '.join(a.set) or 'params.yaml'})")
