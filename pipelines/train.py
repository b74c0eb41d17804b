"""Stage `train@NAME`: cross-validate, train and register model NAME of params.yaml `train.models`
(MLflow run in experiment endopheno.train, registry endopheno.NAME); its metrics go to
stores/models/NAME/metrics.json for `dvc metrics show`."""

import sys

from _stage import params, run

if __name__ == "__main__":
    name = sys.argv[1]
    run(f"train {name}", {"metrics": f"{params('train')['checkpoints']}/{name}/metrics.json"})
