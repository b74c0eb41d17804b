"""Stage `extract@SET`: the registered model of the feature set's definition (features/SET.yaml,
producer.model, e.g. endopheno.autoencoder3d@champion) -> a new version of stores/features/SET (none
when model version and volumes are unchanged)."""

import sys

from _stage import run

if __name__ == "__main__":
    run("extract", {"feature_set": sys.argv[1]})
