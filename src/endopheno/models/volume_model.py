"""The unit the registry stores: a trained network together with everything it needs to read the store.

`VolumeModel` takes the input maps at the model's resolution as ``VolumeDataset.volume`` gives them
(pooled, not normalised) and applies the training subjects' normalisation and the brain mask itself,
so that a registered version is self-contained: extraction and attribution load it and feed it
volumes, nothing else. ``affine`` maps its voxel grid to MNI mm (the store's affine, scaled by the
pooling factor), so maps computed on its inputs are written with their true position.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from endopheno.models.data import filtered

OUTPUTS = ("embedding", "probability", "prediction")


class VolumeModel(nn.Module):
    def __init__(self, net: nn.Module, *, architecture: str, task: str, inputs: tuple[str, ...], factor: int,
                 affine: np.ndarray, mean: torch.Tensor, sd: torch.Tensor, mask: torch.Tensor,
                 target_mean: float = 0.0, target_sd: float = 1.0, classes: tuple[str, ...] = (),
                 highpass_voxels: float | None = None, midline: float | None = None):
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


def model_grid_affine(store_affine: np.ndarray, factor: int) -> np.ndarray:
    """The affine of a grid average-pooled by `factor`: voxel i covers store voxels i·f … i·f+f−1, so
    its centre sits (f−1)/2 store voxels further along each axis."""
    a = np.asarray(store_affine, dtype=np.float64).copy()
    a[:3, 3] = a[:3, :3] @ np.full(3, (factor - 1) / 2) + a[:3, 3]
    a[:3, :3] = a[:3, :3] * factor
    return a
