"""Varimax rotation of an autoencoder's latent code: the same network, with latent axes that each change
a compact part of the brain.

A linear latent is defined only up to an invertible linear map, which the decoder's first layer can
undo. Trained for reconstruction, its axes are mixtures of whole-brain patterns, so a GWAS that tests
one dimension at a time finds an effect that a *direction* of the code carries only if some axis
happens to lie along it. Whitening the code over the training subjects and rotating it by varimax
(Kaiser 1958, Psychometrika 23:187) of the dimensions' activation patterns (Haufe et al. 2014,
NeuroImage 87:96: the covariance of each code dimension with the input voxels) gives the axes whose
patterns are as sparse as an orthogonal rotation allows: the "simple structure" of factor analysis,
here in space. The map is folded into the encoder's last Linear and the decoder's first, so the
reconstructions do not change and extraction needs nothing new. On the phantom it turns the ventricle
effect that one direction of `ae_t1` held into one dimension (BENCHMARKS.md).

Assumes more subjects than latent dimensions and a code of full rank (whitening inverts its
covariance); the rotation is unsupervised (images only), so testing its dimensions against genotypes
is as valid as testing the unrotated ones.
"""

from __future__ import annotations

import numpy as np
import torch


def varimax(loadings: np.ndarray, iterations: int = 200, tol: float = 1e-7) -> np.ndarray:
    """The orthogonal rotation R (k × k) maximising the varimax criterion of ``loadings @ R`` (p × k):
    the summed variance, over the columns, of the squared loadings; maximised by the SVD iteration of R's
    `stats::varimax`, without its row (Kaiser) normalisation, which would give a noise voxel the weight
    of a voxel the code explains well."""
    p, k = loadings.shape
    rotation, criterion = np.eye(k), 0.0
    for _ in range(iterations):
        rotated = loadings @ rotation
        u, s, vt = np.linalg.svd(loadings.T @ (rotated ** 3 - rotated * (rotated ** 2).mean(0)))
        rotation, previous, criterion = u @ vt, criterion, s.sum()
        if previous and criterion < previous * (1 + tol):
            break
    return rotation


@torch.no_grad()
def rotate_latent(net: torch.nn.Module, codes: np.ndarray, inputs: np.ndarray) -> dict[str, float]:
    """Whiten and varimax-rotate the latent of `net` (an `Autoencoder3d`) in place.

    codes: [n, k] the net's codes of the fitting subjects; inputs: [n, voxels] their input maps (in the
    net's normalised space, brain voxels only). Afterwards `net.encode` returns ``(z - mean) @ A``
    (zero mean and identity covariance over those subjects, axes ordered by the variance their pattern
    explains, each signed so that its largest voxel loading is positive) and `net.decode` maps it back
    to the same reconstruction. Returns the varimax criterion before and after."""
    codes, inputs = np.asarray(codes, np.float64), np.asarray(inputs, np.float64)
    n, k = codes.shape
    if n <= k:
        raise ValueError(f"a varimax rotation of a {k}-dim code needs more than {k} subjects, got {n}")
    mean = codes.mean(0)
    u, s, vt = np.linalg.svd(codes - mean, full_matrices=False)
    whiten = vt.T / s * np.sqrt(n - 1)                       # (z - mean) @ whiten: identity covariance
    scores = (codes - mean) @ whiten
    patterns = (inputs - inputs.mean(0)).T @ scores / (n - 1)   # voxels × k: covariance with each dimension
    rotation = varimax(patterns)
    rotated = patterns @ rotation
    order = np.argsort(-(rotated ** 2).sum(0))
    signs = np.sign(rotated[np.abs(rotated).argmax(0), np.arange(k)])[order]
    rotation = rotation[:, order] * signs

    def criterion(p):
        return float(((p ** 2).var(0)).sum())

    a = whiten @ rotation                                    # z' = (z - mean) @ a
    encoder, expand = net.encoder[-1], net.expand[0]
    dtype = encoder.weight.dtype
    a_t, a_inv, m = (torch.as_tensor(x, dtype=torch.float64) for x in (a, np.linalg.inv(a), mean))
    w, b = encoder.weight.double(), encoder.bias.double()
    encoder.weight.copy_((a_t.T @ w).to(dtype))
    encoder.bias.copy_(((b - m) @ a_t).to(dtype))
    w, b = expand.weight.double(), expand.bias.double()
    expand.weight.copy_((w @ a_inv.T).to(dtype))
    expand.bias.copy_((b + w @ m).to(dtype))
    return {"varimax_before": criterion(patterns), "varimax_after": criterion(patterns @ rotation)}
