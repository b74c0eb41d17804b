"""Why `cnn3d` stays below the linear SVM: variants of the network and of a linear model, trained by the
same `fit` loop (AdamW, one-cycle, early stopping on the validation loss) on the same 5 outer folds,
with every subject's pooled maps held in memory (~3 min per variant at 6 mm on 2 cores).

    python benchmarks/cnn3d_capacity.py '{}' '{"arch": "linear"}' '{"seeds": 5}' \
        '{"options": {"widths": [8], "kernels": [3], "dropout": 0.5}}'

Each argument is one variant (JSON): ``options`` (architecture options over params.yaml's),
``res`` (mm), ``lr``, ``wd``, ``epochs``, ``patience``, ``batch_size``, ``mixup`` (Beta α); ``no_bn``
(the BatchNorm layers left out); ``smooth`` (Gaussian SD in voxels applied to the maps first); ``arch: linear`` (Flatten -> Linear, logistic
regression on the voxels through the same loop); ``voxelwise`` (z-score each voxel with the training
subjects' mean and SD instead of one mean and SD per map); ``coords`` (three coordinate channels, a
location prior); ``seeds: k`` (average the probabilities of k networks: is the gap variance?); ``last``
(keep the last epoch instead of the best validation loss; set ``patience`` high); ``flip: p`` (each training
subject mirrored left-right with probability p: the phantom's AD atrophy is bilateral); ``tta`` (the test
subjects' probabilities averaged with their mirror images'); ``sym`` (the maps symmetrised: each voxel
the mean of itself and its mirror voxel). Mirroring reverses array axis 0, i.e. reflects about the pooled
grid's centre, which at 6 mm lies 2 mm right of the midline (BENCHMARKS.md); ``refit`` (then train
again from the same initial weights on training + validation for the chosen number of epochs, as the SVM
baseline refits with its chosen C); ``covariates: [age, ...]`` (participants.tsv columns whose linear
effect on each voxel, fitted in the training fold's controls, is removed from every subject's map first;
default params.yaml's; not with ``smooth``);
``svm`` (also score the pipeline's linear SVM baseline on exactly the maps the network reads). Prints one line per
variant: balanced accuracy and AUC, mean ± SD over the folds.
"""

import copy
import json
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from _common import machine
from endopheno.models.architectures import build
from endopheno.models.data import fit_normalisation
from endopheno.models.splits import outer_folds
from endopheno.models.train import Trainer, fit, linear_baseline, load_train_params, model_spec, outputs, scores
from endopheno.params import load_params


class Mirrored(torch.utils.data.Dataset):
    """Each training subject mirrored left-right (array axis 0 of the RAS grid) with probability `prob`."""

    def __init__(self, data, prob: float, seed: int):
        self.data, self.prob, self.rng = data, prob, np.random.default_rng(seed)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, label = self.data[i]
        return (x.flip(1) if self.rng.random() < self.prob else x), label


def run(cfg: dict) -> str:
    p = load_train_params({**load_params("train"), "resolution_mm": cfg.get("res", 6.0), "tracking_uri": None})
    spec = model_spec(p, "cnn3d")
    spec = replace(spec, options={**spec.options, **cfg.get("options", {})}, epochs=cfg.get("epochs", spec.epochs),
                   patience=cfg.get("patience", spec.patience), learning_rate=cfg.get("lr", spec.learning_rate),
                   weight_decay=cfg.get("wd", spec.weight_decay), mixup=cfg.get("mixup", spec.mixup),
                   batch_size=cfg.get("batch_size", spec.batch_size), covariates=tuple(cfg.get("covariates", spec.covariates)))
    tr = Trainer(p, spec)
    volumes, y, mask, cpu = tr.volumes, tr.data.target, tr.mask, torch.device("cpu")
    if cfg.get("smooth"):
        from scipy.ndimage import gaussian_filter

        sigma = (0, 0, *(cfg["smooth"],) * 3)
        volumes = torch.from_numpy(gaussian_filter(volumes.numpy(), sigma)) * mask
    splits = outer_folds(tr.data.groups, tr.data.strata, folds=p.folds, validation_fraction=p.validation_fraction, seed=p.seed)
    ba, auc, svm, t0 = [], [], [], time.time()
    for s in splits:
        if spec.covariates:  # the trainer's own: effects fitted in the fold's training controls
            volumes = tr.maps(np.arange(len(y)), tr.adjustment(s))
        if cfg.get("voxelwise"):
            mean, sd = volumes[s.train].mean(0), volumes[s.train].std(0).clamp_min(1e-3)
        else:
            mean, sd = fit_normalisation(volumes[s.train], mask)
        z = (volumes - mean) / sd * mask
        if cfg.get("sym"):  # each voxel the mean of itself and its mirror voxel: the bilateral part of the map
            z = (z + z.flip(2)) / 2
        if cfg.get("svm"):  # the pipeline's baseline on exactly these maps
            svm.append(linear_baseline("classification", z[:, 0][:, mask].numpy(), y, s, p.svm_c)["balanced_accuracy"])
        if cfg.get("coords"):
            grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, n) for n in z.shape[2:]], indexing="ij"))
            z = torch.cat([z, grid.expand(len(z), -1, -1, -1, -1)], 1)

        def loader(rows, shuffle, flipped=False):
            data = torch.utils.data.TensorDataset(z[rows].flip(2) if flipped else z[rows], torch.tensor(y[rows], dtype=torch.float32))
            if shuffle and cfg.get("flip"):
                data = Mirrored(data, cfg["flip"], s.fold)
            return torch.utils.data.DataLoader(data, batch_size=spec.batch_size, shuffle=shuffle,
                                               generator=torch.Generator().manual_seed(s.fold))

        probabilities = []
        for k in range(cfg.get("seeds", 1)):
            torch.manual_seed(p.seed + s.fold + 100 * k)
            if cfg.get("arch") == "linear":
                net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(z[0].numel(), 2))
            else:
                net = build(spec.architecture, tuple(z.shape[2:]), z.shape[1], 2, **spec.options)
                if cfg.get("no_bn"):
                    for block in net.features[:-3]:
                        block[1] = torch.nn.Identity()
            initial = copy.deepcopy(net.state_dict())
            last = {}
            keep_last = (lambda _: last.update(state=copy.deepcopy(net.state_dict()))) if cfg.get("last") else None
            result = fit(net, loader(s.train, True), loader(s.validation, False), task="classification", spec=spec,
                         epochs=spec.epochs, device=cpu, amp=False, mask=mask, on_epoch=keep_last)
            if last:
                net.load_state_dict(last["state"])
            if cfg.get("refit"):
                # As the SVM baseline does: the epochs early stopping chose, again from the same start, on
                # training + validation subjects (the one-cycle schedule then spans those epochs).
                net.load_state_dict(initial)
                last = {}
                fit(net, loader(np.r_[s.train, s.validation], True), loader(s.validation, False), task="classification",
                    spec=replace(spec, patience=10**6), epochs=max(result.best_epoch, 3), device=cpu, amp=False, mask=mask,
                    on_epoch=lambda _: last.update(state=copy.deepcopy(net.state_dict())))
                net.load_state_dict(last["state"])
            probabilities.append(outputs(net, loader(s.test, False), task="classification", device=cpu, mask=mask))
            if cfg.get("tta"):  # test-time mirroring: the mean of the subject's and its mirror image's probabilities
                probabilities.append(outputs(net, loader(s.test, False, flipped=True), task="classification", device=cpu, mask=mask))
        score = scores("classification", np.mean(probabilities, 0), y[s.test])
        ba.append(score["balanced_accuracy"]), auc.append(score["auc"])
    return (f"{json.dumps(cfg)}: BA {np.mean(ba):.3f} ± {np.std(ba, ddof=1):.3f}, AUC {np.mean(auc):.3f} ± "
            f"{np.std(auc, ddof=1):.3f}" + (f", SVM BA {np.mean(svm):.3f} ± {np.std(svm, ddof=1):.3f}" if svm else "") +
            f" ({time.time() - t0:.0f} s)")



if __name__ == "__main__":
    print(f"machine: {machine()}")
    for arg in sys.argv[1:] or ["{}"]:
        print(run(json.loads(arg)), flush=True)
