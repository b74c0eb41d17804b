"""Stage `attribute@NAME`: explain the registered model endopheno.NAME@alias (params.yaml `attribute`):
heatmaps with their checks, group maps and figures, scores against the truth map beside the linear SVM's
pattern, and for the autoencoder the latent-to-region table; written to stores/attribution/NAME."""

import sys

from _stage import params, run

if __name__ == "__main__":
    name = sys.argv[1]
    run("attribute", {"model": f"endopheno.{name}@{params('attribute').get('alias', 'champion')}"})
