"""The unit the registry stores: a trained network together with everything it needs to read the store.

`VolumeModel` takes the input maps at the model's resolution as ``VolumeDataset.volume`` gives them
(pooled, not normalised) and applies the training subjects' normalisation and the brain mask itself,
so that a registered version is self-contained: extraction and attribution load it and feed it
volumes, nothing else. ``affine`` maps its voxel grid to MNI mm (the store's affine, scaled by the
pooling factor), so maps computed on its inputs are written with their true position.

A model trained with `covariates` (age, sex: data.covariate_effects) reads maps with those effects
removed, which needs each subject's values: `reader` builds the Dataset extraction and attribution read,
from the participants table, so that what the network sees is what training gave it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from endopheno.errors import InputError
from endopheno.models.data import VolumeDataset, covariate_design, filtered, participant_table

OUTPUTS = ("embedding", "probability", "prediction")


class VolumeModel(nn.Module):
    def __init__(self, net: nn.Module, *, architecture: str, task: str, inputs: tuple[str, ...], factor: int,
                 affine: np.ndarray, mean: torch.Tensor, sd: torch.Tensor, mask: torch.Tensor,
                 target_mean: float = 0.0, target_sd: float = 1.0, classes: tuple[str, ...] = (),
                 highpass_voxels: float | None = None, midline: float | None = None, covariates: dict | None = None,
                 covariate_effects: torch.Tensor | None = None):
        super().__init__()
        self.net = net
        self.architecture, self.task, self.inputs, self.factor = architecture, task, tuple(inputs), int(factor)
        self.affine = np.asarray(affine, dtype=np.float64)
        self.target_mean, self.target_sd, self.classes = float(target_mean), float(target_sd), tuple(classes)
        self.highpass_voxels, self.midline = highpass_voxels, midline
        # per channel ([C] or [C, 1, 1, 1]) or per voxel ([C, X, Y, Z]: data.fit_normalisation)
        self.register_buffer("mean", (mean if mean.dim() == 4 else mean.reshape(-1, 1, 1, 1)).float())
        self.register_buffer("sd", (sd if sd.dim() == 4 else sd.reshape(-1, 1, 1, 1)).float())
        self.register_buffer("mask", mask.float())
        # {name: levels} (data.covariate_design) and their slopes [K, C, X, Y, Z], fitted in the training controls
        self.covariates = dict(covariates or {})
        self.register_buffer("covariate_effects", None if covariate_effects is None else covariate_effects.float())

    @property
    def embedding_dim(self) -> int:
        return int(self.net.embedding_dim)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """What the network reads: the (high-passed, bilateral) maps standardised with the training statistics."""
        # getattr: versions registered before the knobs
        x = filtered(x, self.mask > 0, getattr(self, "highpass_voxels", None), getattr(self, "midline", None))
        return (x - self.mean) / self.sd * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (classification), the standardised prediction (regression) or the reconstruction
        of the normalised input (autoencoder): what attribution methods differentiate."""
        return self.net(self.normalise(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The endophenotype: the penultimate layer, or the autoencoder's latent."""
        return self.net.embed(self.normalise(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, output: str = "embedding") -> torch.Tensor:
        """[B, D] embedding, [B] probability of the positive class, or [B] prediction in target units."""
        if output == "embedding":
            return self.embed(x)
        out = self(x)
        if output == "probability" and self.task == "classification":
            return torch.softmax(out.float(), dim=1)[:, -1]
        if output == "prediction" and self.task == "regression":
            return out[:, 0].float() * self.target_sd + self.target_mean
        raise ValueError(f"output {output!r} does not apply to a {self.task} model")


def reader(model: VolumeModel, store, rows: np.ndarray, keys: np.ndarray, participants=None):
    """The Dataset of the store's subjects `rows` (subject keys `keys`) as `model` reads them, and the rows
    kept: with covariates, a subject whose values `participants` lacks is left out, with one line for each
    in the returned [(subject, reason)] (the others go on)."""
    covariates = getattr(model, "covariates", {})   # versions registered before the knob have none
    failed, design = [], None
    if covariates:
        if participants is None:
            raise InputError(f"{model.architecture} model", f"reads maps adjusted for {', '.join(covariates)}: give the "
                                                            "participants table that holds them")
        from endopheno.volumes.preprocess import split_row_label

        table = participant_table(participants)
        groups = np.array([split_row_label(k)[0] for k in keys])
        known = np.isin(groups, table.index)
        known[known] = table.loc[groups[known], list(covariates)].notna().all(axis=1).to_numpy()
        failed = [(str(k), f"no {', '.join(covariates)} in {participants}") for k in keys[~known]]
        rows, groups = np.asarray(rows)[known], groups[known]
        design, _ = covariate_design(table.loc[groups], list(covariates), covariates)
    dataset = VolumeDataset(store, rows, np.zeros(len(rows)), inputs=model.inputs, factor=model.factor,
                            mask=model.mask.bool().cpu(), adjust=(design, model.covariate_effects) if covariates else None)
    return dataset, rows, failed


def model_grid_affine(store_affine: np.ndarray, factor: int) -> np.ndarray:
    """The affine of a grid average-pooled by `factor`: voxel i covers store voxels i·f … i·f+f−1, so
    its centre sits (f−1)/2 store voxels further along each axis."""
    a = np.asarray(store_affine, dtype=np.float64).copy()
    a[:3, 3] = a[:3, :3] @ np.full(3, (factor - 1) / 2) + a[:3, 3]
    a[:3, :3] = a[:3, :3] * factor
    return a


def check_grid(model: VolumeModel, ds, label: str) -> None:
    """Refuse a volume store whose grid, pooled as `model` pools it, is not the grid the model was trained
    on: another shape would fail deep in the network, another affine would read every voxel from the
    wrong place in the brain without an error."""
    store = np.asarray(ds.attrs["affine"])
    shape = tuple(-(-n // model.factor) for n in ds.brain_mask.shape)
    if shape != tuple(model.mask.shape):
        raise InputError(label, f"was trained on a {list(model.mask.shape)} grid; this volume store gives "
                                f"{list(shape)} at pooling factor {model.factor}: retrain it on this store")
    if not np.allclose(model_grid_affine(store, model.factor), model.affine):
        raise InputError(label, f"was trained on a grid with origin {np.round(model.affine[:3, 3], 2).tolist()} mm and "
                                f"voxels of {np.round(np.abs(np.diag(model.affine)[:3]), 2).tolist()} mm; this volume store "
                                f"gives {np.round(model_grid_affine(store, model.factor)[:3, 3], 2).tolist()} mm: retrain it on this store")
