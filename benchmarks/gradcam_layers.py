"""Why a Guided Grad-CAM map can miss what the other heatmaps find: its two factors, scored apart.

Grad-CAM (Selvaraju et al. 2017) weights a layer's channels by the mean gradient of the explained output
and keeps the ReLU of their sum: only evidence *for* that output. A network may hold its evidence of AD
as healthy-tissue features whose loss raises the AD logit; there the gradient-weighted sum is negative at
the atrophy, the ReLU removes it, and what remains lies elsewhere. This script scores, on the subjects
and truth map of the `attribute` stage (params.yaml), for each Conv3d of the model: Grad-CAM as
published (ReLU per subject), the magnitude of the signed CAM, and the share of brain voxels where the
positive group's mean CAM is above zero, for the AD and the CN logit; then guided backpropagation
alone and the pipeline's Guided Grad-CAM. Every AUC is that of |group mean map| against the truth mask,
as `scores.tsv` has it.

Reads a finished `dvc repro` from the repository root:

    python benchmarks/gradcam_layers.py [--model endopheno.cnn3d@champion]
"""

import argparse
import warnings

import mlflow
import numpy as np
import torch
from captum.attr import GuidedBackprop, LayerAttribution, LayerGradCam

from _common import machine
from endopheno.attribution.heatmaps import attribute
from endopheno.attribution.run import _usable, explained_subjects, load_attribute_params, truth_on_grid
from endopheno.attribution.score import roc_auc
from endopheno.models.extract import load_model, resolve
from endopheno.params import load_params
from endopheno.tracking import tracking_uri
from endopheno.volumes.preprocess import open_mni


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="endopheno.cnn3d@champion")
    a = ap.parse_args()
    warnings.filterwarnings("ignore", "Setting backward hooks on ReLU", UserWarning)
    p = load_attribute_params(load_params("attribute"))
    mlflow.set_tracking_uri(tracking_uri(p.tracking_uri))
    name, version = resolve(a.model)
    model = load_model(name, version).eval()
    x, _, diagnosis = explained_subjects(p, model, _usable(p, model, open_mni(p.store), "reconstruction"), [])
    x = x[torch.from_numpy(diagnosis == p.classes[-1])]
    mask = model.mask.numpy() > 0
    truth = np.abs(truth_on_grid(p.truth, tuple(model.mask.shape), model.affine))

    def auc(group_map) -> float:
        return roc_auc(group_map, truth, mask, threshold=p.truth_threshold)

    def cam(layer, target: int, relu: bool) -> tuple[np.ndarray, tuple]:
        """Subject maps upsampled to the input grid, and the layer's own grid."""
        local = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=relu)
        up = LayerAttribution.interpolate(local, tuple(x.shape[2:]), "trilinear").detach().numpy()[:, 0]
        return up, tuple(local.shape[2:])

    positive = model.classes.index(p.classes[-1])
    print(f"{machine()}; {name}/{version}, {len(x)} {p.classes[-1]} subjects, truth voxels "
          f"{int((truth[mask] > p.truth_threshold).sum())} of {int(mask.sum())}\n")
    print("| layer (grid) | logit | Grad-CAM AUC (ReLU, as published) | \\|signed CAM\\| AUC | brain share of CAM > 0 |")
    print("| --- | --- | --- | --- | --- |")
    convs = [m for m in model.net.modules() if isinstance(m, torch.nn.Conv3d)]
    for i, layer in enumerate(convs):
        for target in (positive, 1 - positive):
            signed, grid = cam(layer, target, relu=False)
            signed = signed.mean(0)
            print(f"| conv {i} {grid}{' (target layer)' if layer is convs[-1] else ''} | {model.classes[target]} | "
                  f"{auc(cam(layer, target, relu=True)[0].mean(0)):.3f} | {auc(signed):.3f} | "
                  f"{np.mean(signed[mask] > 0):.2f} |", flush=True)
    guided = GuidedBackprop(model).attribute(x.clone().requires_grad_(), target=positive).detach().numpy()[:, 0]
    print(f"\nguided backpropagation alone: AUC {auc(guided.mean(0)):.3f}; Guided Grad-CAM (the pipeline's): "
          f"{auc(attribute(model, x, 'guided_gradcam', target=positive)[:, 0].mean(0)):.3f}")


if __name__ == "__main__":
    main()
