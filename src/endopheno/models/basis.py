"""The axes of an autoencoder's latent code: spatially independent components (source-based
morphometry), folded into the network.

A linear latent is defined only up to an invertible linear map, which the decoder's first layer can
undo. Trained for reconstruction, its axes are arbitrary mixtures of whole-brain patterns, so a GWAS
that tests one dimension at a time finds an effect that a *direction* of the code carries only if some
axis happens to lie along it. Here each dimension's activation pattern (Haufe et al. 2014, NeuroImage
87:96: its covariance with the input voxels, over the training subjects) is computed for the whitened
code, and the code is transformed so that these patterns become spatially independent components:
FastICA (Hyvärinen 1999, IEEE Trans Neural Netw 10:626; scikit-learn's) with the voxels as samples,
as source-based morphometry does for grey-matter maps (Xu et al. 2009, Hum Brain Mapp 30:711). Each
axis then changes a compact part of the brain. The map is folded into the encoder's last Linear and the
decoder's first, so reconstructions do not change and extraction needs nothing new.

Assumptions: more subjects than latent dimensions and a code of full rank (whitening inverts its
covariance); non-Gaussian (sparse) spatial sources, which ICA needs. The transform is unsupervised (the
images only), so testing its dimensions against genotypes is as valid as testing the raw code's. It
depends on the span of the code, not on its axes: the same network with its code mixed by any invertible
map gives the same components (`tests/test_models.py`). A varimax rotation of the same patterns
(Kaiser 1958) was tried first and dropped: in 128 dimensions its optimum is so flat that five starts
reached the same criterion with different axes (BENCHMARKS.md, `benchmarks/latent_axes.py`). Off by
default: the components have unit variance each, so a ridge regression on them loses the trained
code's variance ordering (BENCHMARKS.md).
"""

from __future__ import annotations

import numpy as np
import torch


def independent_components(codes: np.ndarray, inputs: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(mean, A): the new code is ``(z - mean) @ A``, one spatially independent component per column,
    with unit variance over the given subjects, ordered by the variance of its activation pattern over
    the voxels, signed so that the pattern's largest loading is positive.

    codes: [n, k] the network's codes of the fitting subjects; inputs: [n, voxels] their input maps."""
    from sklearn.decomposition import FastICA

    codes, inputs = np.asarray(codes, np.float64), np.asarray(inputs, np.float64)
    n, k = codes.shape
    if n <= k:
        raise ValueError(f"independent components of a {k}-dim code need more than {k} subjects, got {n}")
    mean = codes.mean(0)
    z = codes - mean
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    whiten = vt.T / s * np.sqrt(n - 1)                          # z @ whiten: identity covariance
    centred = inputs - inputs.mean(0)
    patterns = centred.T @ (z @ whiten) / (n - 1)               # voxels × k
    ica = FastICA(n_components=k, whiten="unit-variance", random_state=seed, max_iter=1000).fit(patterns)
    a = whiten @ ica.components_.T
    a /= (z @ a).std(0, ddof=1)
    maps = centred.T @ (z @ a) / (n - 1)
    order = np.argsort(-(maps ** 2).sum(0))
    signs = np.sign(maps[np.abs(maps).argmax(0), np.arange(k)])
    return mean, (a * signs)[:, order]


@torch.no_grad()
def fold_into(net: torch.nn.Module, mean: np.ndarray, a: np.ndarray) -> None:
    """Make ``net.encode`` return ``(z - mean) @ a`` and ``net.decode`` undo it (an `Autoencoder3d`)."""
    encoder, expand = net.encoder[-1], net.expand[0]
    dtype = encoder.weight.dtype
    a_t, a_inv, m = (torch.as_tensor(x, dtype=torch.float64) for x in (a, np.linalg.inv(a), mean))
    w, b = encoder.weight.double(), encoder.bias.double()
    encoder.weight.copy_((a_t.T @ w).to(dtype))
    encoder.bias.copy_(((b - m) @ a_t).to(dtype))
    w, b = expand.weight.double(), expand.bias.double()
    expand.weight.copy_((w @ a_inv.T).to(dtype))
    expand.bias.copy_((b + w @ m).to(dtype))
