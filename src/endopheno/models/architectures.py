"""The networks that turn a template-space volume into imaging endophenotypes.

Every model takes a float tensor ``[B, C, X, Y, Z]`` (C = `in_channels`, (X, Y, Z) = `in_shape`, any
sizes, odd or even) and offers:

- ``forward(x)``: ``[B, n_outputs]`` logits (classification) or values (regression); the autoencoder
  returns its reconstruction ``[B, C, X, Y, Z]`` instead.
- ``embed(x)``: ``[B, embedding_dim]``, the endophenotypes: the penultimate layer after its ReLU for the
  supervised models, the linear latent code for the autoencoder.
- ``target_layer``: the last convolutional module that `embed` runs (for Grad-CAM; for the inception
  models the last inception module, whose output is the concatenation of its convolution paths).
- ``config``: the constructor's keyword arguments as a plain dict, so that ``build(name, **config)``
  rebuilds the same network (then ``load_state_dict``); ``name``: the registry name.

Built only from layers a layer-wise relevance propagation (LRP) rule registry can handle: Conv, BatchNorm,
ReLU, MaxPool, AdaptiveAvgPool, Flatten, Linear, Dropout, ConvTranspose3d and plain tensor operations
(cat, reshape, mean, add, indexing); the `parcels` bottleneck of `Autoencoder3d` adds two linear maps
(`ParcelRead`, `ParcelPaint`) that no LRP rule set knows. Each ReLU is its own, not in-place module, and no module runs twice
in one forward pass: captum's LRP and guided backpropagation attach hooks to modules, and a module called
twice (or a functional ``relu``) would escape or confuse them. The one exception is the gated-attention
pooling of `SliceNet` (Tanh, Sigmoid, softmax), which an LRP rule set must treat as a gate (off by default).
"""

from __future__ import annotations

import inspect
import itertools
import math

import torch
from torch import nn

from endopheno.errors import InputError

__all__ = ["ARCHITECTURES", "Autoencoder3d", "CNN3d", "Inception3d", "InceptionModule3d", "InceptionResNet3d",
           "PatchNet", "SliceNet", "build", "parcel_centres_in", "patch_grid"]


# ---- shared pieces -------------------------------------------------------------------------------

def _shape3(name: str, in_shape) -> tuple[int, int, int]:
    try:
        shape = tuple(int(n) for n in in_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(name, f"in_shape must be three positive sizes (X, Y, Z), got {in_shape!r}")
    return shape


def _ints(name: str, key: str, value, minimum: int = 1) -> tuple[int, ...]:
    """A non-empty tuple of ints >= minimum (lists from a JSON config become tuples)."""
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if not out or min(out) < minimum:
        raise InputError(name, f"{key} must be a non-empty sequence of integers >= {minimum}, got {value!r}")
    return out


def _positive(name: str, key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(name, f"{key} must be a positive integer, got {value!r}")
    return value


def _probability(name: str, value) -> float:
    if not 0.0 <= float(value) < 1.0:
        raise InputError(name, f"dropout must lie in [0, 1), got {value!r}")
    return float(value)


def _conv_block(in_channels: int, out_channels: int, kernel: int, dims: int = 3) -> nn.Sequential:
    """Conv (same padding for odd kernels) -> BatchNorm -> ReLU -> MaxPool(2, ceil_mode): the block of
    `CNN3d`, the `PatchNet` branches, the `SliceNet` encoder and the inception stem. ceil_mode keeps the
    last row of an odd-sized axis instead of dropping it."""
    conv, norm, pool = ((nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d) if dims == 3 else
                        (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d))
    return nn.Sequential(conv(in_channels, out_channels, kernel, padding=kernel // 2), norm(out_channels), nn.ReLU(),
                         pool(2, ceil_mode=True))


def _block_size(n: int, kernel: int) -> int:
    """Length of an axis after `_conv_block`: the convolution (n + 2·(k//2) − k + 1), then ceil(n / 2)."""
    return math.ceil((n + 2 * (kernel // 2) - kernel + 1) / 2)


def _conv_stack(in_channels: int, widths, kernels, shape, hidden: int) -> nn.Sequential:
    """Conv blocks, Flatten, Linear(hidden), ReLU: the feature extractor of `CNN3d` and of each `PatchNet`
    branch. The Linear's input size is computed, not probed with a dummy forward pass (which would touch
    the BatchNorm running statistics)."""
    layers, c = [], in_channels
    for w, k in zip(widths, kernels):
        layers.append(_conv_block(c, w, k))
        shape, c = [_block_size(n, k) for n in shape], w
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * math.prod(shape), hidden), nn.ReLU())


def _last(module: nn.Module, kind) -> nn.Module:
    return [m for m in module.modules() if isinstance(m, kind)][-1]


class _Model(nn.Module):
    """Base: the input check and `forward` = head(embed(x)) of the supervised models."""

    name = ""

    def _check(self, x: torch.Tensor) -> None:
        c, shape = self.config["in_channels"], self.config["in_shape"]
        if x.ndim != 5 or x.shape[1] != c or tuple(x.shape[2:]) != shape:
            raise InputError(self.name, f"expects input [B, {c}, {shape[0]}, {shape[1]}, {shape[2]}], got "
                                        f"{list(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


# ---- cnn3d ---------------------------------------------------------------------------------------

class CNN3d(_Model):
    """A plain 3D CNN on the whole volume, the kind explained with LRP by Böhle, Eitel, Weygandt & Ritter
    (2019, Front. Aging Neurosci. 11:194) for Alzheimer's disease classification.

    Blocks Conv3d(k, padding k//2) -> BatchNorm3d -> ReLU -> MaxPool3d(2, ceil_mode), then Flatten ->
    Linear(hidden) -> ReLU (the embedding) -> Dropout -> Linear(n_outputs). Böhle et al.'s released network
    has four blocks of 8/16/32/64 3³ filters without padding and dense layers 128-64-2; the defaults here
    (five blocks of 24 filters, kernels 7-5-5-3-3, one hidden layer of 64) are this project's: wide early
    kernels see a large context at the full resolution, and five poolings shrink a 2 mm MNI volume
    (91 × 109 × 91) to 3 × 4 × 3 before the dense layer.

    Parameters
    ----------
    in_shape : (X, Y, Z) of the input volume.
    in_channels : input maps (T1, grey matter, ...), stacked as channels.
    n_outputs : classes (logits) or regression targets.
    widths, kernels : filters and kernel size of each block (same length).
    hidden : units of the embedding layer (`embedding_dim`).
    dropout : before the output layer.
    """

    name = "cnn3d"

    def __init__(self, in_shape, in_channels: int = 1, n_outputs: int = 2, widths=(24, 24, 24, 24, 24),
                 kernels=(7, 5, 5, 3, 3), hidden: int = 64, dropout: float = 0.0):
        super().__init__()
        n = self.name
        in_shape, widths, kernels = _shape3(n, in_shape), _ints(n, "widths", widths), _ints(n, "kernels", kernels)
        if len(widths) != len(kernels):
            raise InputError(n, f"widths {widths} and kernels {kernels} must have the same length")
        self.config = dict(in_shape=in_shape, in_channels=_positive(n, "in_channels", in_channels),
                           n_outputs=_positive(n, "n_outputs", n_outputs), widths=widths, kernels=kernels,
                           hidden=_positive(n, "hidden", hidden), dropout=_probability(n, dropout))
        self.features = _conv_stack(in_channels, widths, kernels, in_shape, hidden)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, n_outputs))
        self.embedding_dim = hidden

    @property
    def target_layer(self) -> nn.Module:
        return _last(self.features, nn.Conv3d)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.features(x)


# ---- patch27 -------------------------------------------------------------------------------------

def patch_grid(in_shape, grid: int = 3) -> list[tuple[slice, slice, slice]]:
    """The volume cut into grid³ boxes that partition it exactly.

    Along each axis of length n the boxes have n // grid or n // grid + 1 voxels (the longer ones first, as
    `numpy.array_split`). Boxes are numbered in C order: index = i·grid² + j·grid + k for the i-th box
    along X, j-th along Y, k-th along Z; with grid 3, patch 13 is the centre.
    """
    shape = _shape3("patch_grid", in_shape)
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1 or grid > min(shape):
        raise InputError("patch_grid", f"grid must be an integer from 1 to the shortest axis {min(shape)}, got "
                                       f"{grid!r}")
    edges = []
    for n in shape:
        sizes = [n // grid + (i < n % grid) for i in range(grid)]
        starts = [sum(sizes[:i]) for i in range(grid + 1)]
        edges.append([slice(starts[i], starts[i + 1]) for i in range(grid)])
    return [tuple(box) for box in itertools.product(*edges)]


class PatchNet(_Model):
    """One small 3D CNN per sub-volume of a 3 × 3 × 3 grid (`patch_grid`), features concatenated.

    The patch-level multi-CNN approach to Alzheimer's disease classification (reviewed and evaluated by
    Wen et al. 2020, Med. Image Anal. 63:101694): one CNN per patch, the patches ranked by their
    single-patch validation performance, the best combined. Here a single-patch model is
    ``PatchNet(patches=(i,))``; the training code ranks the 27 on inner validation and warm-starts the
    combined model from the best k with `from_branches`.

    Branch: conv blocks as in `CNN3d` (Conv3d -> BatchNorm3d -> ReLU -> MaxPool3d(2)), Flatten,
    Linear(hidden), ReLU. The branch outputs, concatenated in the order of `patches`, are the embedding
    (``hidden · len(patches)``), followed by Dropout -> Linear(n_outputs).

    Parameters
    ----------
    in_shape, in_channels, n_outputs : as `CNN3d`.
    patches : grid indices (0–26) of the branches, in order, no repeats.
    widths, kernels, hidden : of every branch. dropout : before the output layer.

    Attributes
    ----------
    branch_index : the patch index each branch sees (= `patches`); `boxes` : their (slice, slice, slice).
    target_layers : the last Conv3d of each branch; `target_layer` is that of the last branch.
    """

    name = "patch27"

    def __init__(self, in_shape, in_channels: int = 1, n_outputs: int = 2, patches=tuple(range(27)),
                 widths=(8, 16, 32), kernels=(3, 3, 3), hidden: int = 32, dropout: float = 0.0):
        super().__init__()
        n = self.name
        in_shape, widths, kernels = _shape3(n, in_shape), _ints(n, "widths", widths), _ints(n, "kernels", kernels)
        patches = _ints(n, "patches", patches, minimum=0)
        if len(widths) != len(kernels):
            raise InputError(n, f"widths {widths} and kernels {kernels} must have the same length")
        if max(patches) > 26 or len(set(patches)) != len(patches):
            raise InputError(n, f"patches must be distinct indices 0-26 of the 3x3x3 grid, got {patches}")
        self.config = dict(in_shape=in_shape, in_channels=_positive(n, "in_channels", in_channels),
                           n_outputs=_positive(n, "n_outputs", n_outputs), patches=patches, widths=widths,
                           kernels=kernels, hidden=_positive(n, "hidden", hidden), dropout=_probability(n, dropout))
        grid = patch_grid(in_shape, 3)
        self.branch_index = patches
        self.boxes = [grid[p] for p in patches]
        self.branches = nn.ModuleList(
            _conv_stack(in_channels, widths, kernels, [s.stop - s.start for s in box], hidden) for box in self.boxes)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden * len(patches), n_outputs))
        self.embedding_dim = hidden * len(patches)

    @property
    def target_layers(self) -> list[nn.Module]:
        return [_last(b, nn.Conv3d) for b in self.branches]

    @property
    def target_layer(self) -> nn.Module:
        return self.target_layers[-1]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        parts = [branch(x[(slice(None), slice(None), *box)]) for branch, box in zip(self.branches, self.boxes)]
        return torch.cat(parts, dim=1)

    @classmethod
    def from_branches(cls, models: list["PatchNet"], n_outputs: int | None = None,
                      dropout: float | None = None) -> "PatchNet":
        """The multi-patch model whose branches are copies of the given models' trained branches.

        The branches come in the order of `models` (and of each model's own branches); the output layer is
        new (randomly initialised), to be fine-tuned. All models must share in_shape, in_channels, widths,
        kernels and hidden and see distinct patches. `n_outputs` and `dropout` default to the first model's.
        """
        if not models or not all(isinstance(m, PatchNet) for m in models):
            raise InputError(cls.name, "from_branches needs a non-empty list of PatchNet models")
        first = models[0].config
        shared = {k: first[k] for k in ("in_shape", "in_channels", "widths", "kernels", "hidden")}
        for m in models[1:]:
            differ = [k for k, v in shared.items() if m.config[k] != v]
            if differ:
                raise InputError(cls.name, f"from_branches: models differ in {', '.join(differ)}")
        combined = cls(**shared, patches=tuple(p for m in models for p in m.branch_index),
                       n_outputs=first["n_outputs"] if n_outputs is None else n_outputs,
                       dropout=first["dropout"] if dropout is None else dropout)
        sources = [b for m in models for b in m.branches]
        for target, source in zip(combined.branches, sources):
            target.load_state_dict(source.state_dict())  # copies weights and BatchNorm statistics
        return combined


# ---- slice2d -------------------------------------------------------------------------------------

class SliceNet(_Model):
    """A 2D CNN applied to every slice along one axis, slice embeddings pooled into one.

    Each slice (the C maps of one plane) goes through Conv2d(3×3) -> BatchNorm2d -> ReLU -> MaxPool2d(2)
    blocks, AdaptiveAvgPool2d(1), Flatten, Linear(hidden), ReLU; slices are folded into the batch so that
    one set of modules runs once per forward pass. An optional learned position embedding (one vector per
    slice index, initialised N(0, 0.02²) as in BERT/ViT) is added, then the S slice embeddings are pooled:

    - ``"mean"``: their average.
    - ``"attention"``: gated attention pooling (Ilse, Tomczak & Welling 2018, ICML, "Attention-based deep
      multiple instance learning"): a_s = softmax_s(wᵀ(tanh(V h_s) ⊙ sigm(U h_s))), pooled = Σ a_s h_s,
      the volume treated as a bag of slices. Tanh and Sigmoid are outside the LRP layer set; an LRP rule
      set should treat the attention as a gate (relevance flows through h_s only).

    The pooled embedding goes through Dropout -> Linear(n_outputs). `last_attention` holds the slice
    weights of the last forward pass, ``[B, S]`` (uniform for mean pooling), for interpretation.
    `target_layer` is the last Conv2d; its activations are per slice, ``[B·S, ...]`` (captum's LayerGradCam
    returns ``[B·S, 1, h, w]``, to be reshaped to ``[B, S, h, w]``; GuidedGradCam cannot upsample that).

    Parameters
    ----------
    in_shape, in_channels, n_outputs : as `CNN3d`.
    axis : spatial axis sliced along (0 = X, 1 = Y, 2 = Z); S = in_shape[axis].
    widths : filters of the 2D blocks; hidden : slice embedding size (`embedding_dim`).
    pooling : "mean" or "attention"; position_encoding : add the learned slice-position embedding.
    dropout : before the output layer.
    """

    name = "slice2d"

    def __init__(self, in_shape, in_channels: int = 1, n_outputs: int = 2, axis: int = 2, widths=(16, 32, 64),
                 hidden: int = 64, pooling: str = "mean", position_encoding: bool = False, dropout: float = 0.0):
        super().__init__()
        n = self.name
        in_shape, widths = _shape3(n, in_shape), _ints(n, "widths", widths)
        if axis not in (0, 1, 2) or isinstance(axis, bool):
            raise InputError(n, f"axis must be 0, 1 or 2 (X, Y, Z), got {axis!r}")
        if pooling not in ("mean", "attention"):
            raise InputError(n, f"pooling must be 'mean' or 'attention', got {pooling!r}")
        self.config = dict(in_shape=in_shape, in_channels=_positive(n, "in_channels", in_channels),
                           n_outputs=_positive(n, "n_outputs", n_outputs), axis=axis, widths=widths,
                           hidden=_positive(n, "hidden", hidden), pooling=pooling,
                           position_encoding=bool(position_encoding), dropout=_probability(n, dropout))
        channels = (in_channels, *widths)
        blocks = [_conv_block(channels[i], channels[i + 1], 3, dims=2) for i in range(len(widths))]
        self.encoder = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], hidden),
                                     nn.ReLU())
        slices = in_shape[axis]
        self.position = nn.Parameter(torch.randn(slices, hidden) * 0.02) if position_encoding else None
        if pooling == "attention":
            self.attention_v = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh())
            self.attention_u = nn.Sequential(nn.Linear(hidden, hidden), nn.Sigmoid())
            self.attention_w = nn.Linear(hidden, 1)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, n_outputs))
        self.embedding_dim = hidden
        self.last_attention: torch.Tensor | None = None

    @property
    def target_layer(self) -> nn.Module:
        return _last(self.encoder, nn.Conv2d)

    def slice_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, S, hidden]``: every slice's embedding (plus its position embedding)."""
        self._check(x)
        b, c = x.shape[:2]
        slices = x.movedim(2 + self.config["axis"], 1)           # [B, S, C, H, W]
        h = self.encoder(slices.reshape(-1, c, *slices.shape[3:])).reshape(b, slices.shape[1], -1)
        return h if self.position is None else h + self.position

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        h = self.slice_embeddings(x)
        if self.config["pooling"] == "mean":
            self.last_attention = torch.full(h.shape[:2], 1.0 / h.shape[1], device=h.device)
            return h.mean(dim=1)
        a = torch.softmax(self.attention_w(self.attention_v(h) * self.attention_u(h)).squeeze(-1), dim=1)
        self.last_attention = a.detach()
        return (a.unsqueeze(-1) * h).sum(dim=1)


# ---- inception3d, inception_resnet3d ------------------------------------------------------------

def _cbr(in_channels: int, out_channels: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv3d(in_channels, out_channels, kernel, padding=kernel // 2), nn.BatchNorm3d(out_channels), nn.ReLU()]


class Add(nn.Module):
    """``a + b`` as a module. Relevance methods that work layer by layer (LRP) must see a residual sum as
    a layer, to share its relevance between the summands in proportion to each one's contribution;
    a plain ``+`` in forward() would hand each summand the whole relevance."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class InceptionModule3d(nn.Module):
    """A 3D inception module (Szegedy et al. 2015, CVPR, "Going deeper with convolutions").

    Four parallel paths of `width` channels each, concatenated (4·width out): 1³; 1³ reduction -> 3³;
    1³ reduction -> two stacked 3³ (the 5³ receptive field, factorised as in Szegedy et al. 2016, CVPR,
    "Rethinking the Inception architecture"); max-pool 3³ stride 1 -> 1³. Every convolution is
    Conv3d -> BatchNorm3d -> ReLU. With `residual`, the concatenation is added to a 1³ projection of the
    input and passed through a ReLU (Inception-ResNet: Szegedy, Ioffe, Vanhoucke & Alemi 2017, AAAI).
    Spatial size is unchanged.
    """

    def __init__(self, in_channels: int, width: int, residual: bool = False):
        super().__init__()
        self.path1 = nn.Sequential(*_cbr(in_channels, width, 1))
        self.path3 = nn.Sequential(*_cbr(in_channels, width, 1), *_cbr(width, width, 3))
        self.path5 = nn.Sequential(*_cbr(in_channels, width, 1), *_cbr(width, width, 3), *_cbr(width, width, 3))
        self.path_pool = nn.Sequential(nn.MaxPool3d(3, stride=1, padding=1), *_cbr(in_channels, width, 1))
        self.projection = nn.Conv3d(in_channels, 4 * width, 1) if residual else None
        self.add = Add() if residual else None
        self.relu = nn.ReLU() if residual else None

    def __setstate__(self, state: dict) -> None:
        # Models pickled (registered) before the sum became a module have no `add`: give them one.
        super().__setstate__(state)
        if "add" not in self._modules:
            self.add = Add() if self.projection is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.path1(x), self.path3(x), self.path5(x), self.path_pool(x)], dim=1)
        return y if self.projection is None else self.relu(self.add(y, self.projection(x)))


class Inception3d(_Model):
    """A 3D inception network with one branch per input map (e.g. T1 and a grey-matter map).

    Per input channel: a stem Conv3d(3³) -> BatchNorm3d -> ReLU -> MaxPool3d(2), then `modules`
    `InceptionModule3d` (4·width channels out), each followed by MaxPool3d(2), then AdaptiveAvgPool3d(1)
    and Flatten. The branches' features are concatenated -> Linear(hidden) -> ReLU (the embedding) ->
    Dropout -> Linear(n_outputs). Inception modules after Szegedy et al. (2015, CVPR); with
    ``residual=True`` (registered as ``inception_resnet3d``) each module adds a 1³ projection of its
    input, after Inception-ResNet (Szegedy et al. 2017, AAAI).

    Parameters
    ----------
    in_shape, in_channels, n_outputs : as `CNN3d`; one branch per input channel.
    residual : residual inception modules. width : channels of each module path (stem: width).
    modules : inception modules per branch. hidden : units of the embedding layer (`embedding_dim`).
    dropout : before the output layer.

    `target_layers`: the last inception module of each branch; `target_layer`: that of the last branch.
    """

    name = "inception3d"

    def __init__(self, in_shape, in_channels: int = 1, n_outputs: int = 2, residual: bool = False, width: int = 16,
                 modules: int = 2, hidden: int = 128, dropout: float = 0.0):
        super().__init__()
        n = self.name
        self.config = dict(in_shape=_shape3(n, in_shape), in_channels=_positive(n, "in_channels", in_channels),
                           n_outputs=_positive(n, "n_outputs", n_outputs), residual=bool(residual),
                           width=_positive(n, "width", width), modules=_positive(n, "modules", modules),
                           hidden=_positive(n, "hidden", hidden), dropout=_probability(n, dropout))

        def branch() -> nn.Sequential:
            layers, c = [_conv_block(1, width, 3)], width
            for _ in range(modules):
                layers += [InceptionModule3d(c, width, bool(residual)), nn.MaxPool3d(2, ceil_mode=True)]
                c = 4 * width
            return nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten())

        self.branches = nn.ModuleList(branch() for _ in range(in_channels))
        self.fc = nn.Sequential(nn.Linear(in_channels * 4 * width, hidden), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, n_outputs))
        self.embedding_dim = hidden

    @property
    def target_layers(self) -> list[nn.Module]:
        return [_last(b, InceptionModule3d) for b in self.branches]

    @property
    def target_layer(self) -> nn.Module:
        return self.target_layers[-1]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.fc(torch.cat([b(x[:, c:c + 1]) for c, b in enumerate(self.branches)], dim=1))


class InceptionResNet3d(Inception3d):
    """`Inception3d` with residual inception modules (Szegedy et al. 2017, AAAI, Inception-ResNet); same
    parameters and defaults, `residual` fixed to True (and absent from `config`)."""

    name = "inception_resnet3d"

    def __init__(self, in_shape, in_channels: int = 1, n_outputs: int = 2, width: int = 16, modules: int = 2,
                 hidden: int = 128, dropout: float = 0.0):
        super().__init__(in_shape, in_channels, n_outputs, residual=True, width=width, modules=modules, hidden=hidden,
                         dropout=dropout)
        del self.config["residual"]


# ---- autoencoder3d -------------------------------------------------------------------------------

def _bumps(in_shape, centres, width: float) -> torch.Tensor:
    """``[K, voxels]`` logits of Gaussian bumps (SD `width` voxels) around K voxel coordinates."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in in_shape], indexing="ij"), -1)
    d2 = ((grid[None] - torch.as_tensor(centres, dtype=torch.float32)[:, None, None, None]) ** 2).sum(-1)
    return (-d2 / (2 * width ** 2)).flatten(1)


class ParcelRead(nn.Module):
    """``[B, C, X, Y, Z]`` features -> ``[B, K]``, the code of the `parcels` bottleneck: K soft parcels,
    each a softmax over voxels of a learnt logit map (`logits`, shared with `ParcelPaint`); each dimension a
    learnt channel mix of its parcel's weighted mean. Linear in the features: the latent stays a linear code."""

    # The parcels learn at ten times the other weights' rate: Adam moves a weight by about the learning
    # rate per step, and a logit must move by units to reshape a parcel (at the shared rate they barely
    # moved: BENCHMARKS.md, "A parcel bottleneck").
    speed = 10.0

    def __init__(self, logits: torch.Tensor, channels: int):
        super().__init__()
        self.logits = nn.Parameter(logits / self.speed)
        self.mix = nn.Parameter(torch.randn(len(logits), channels) / math.sqrt(channels))
        self.bias = nn.Parameter(torch.zeros(len(logits)))

    def weights(self) -> torch.Tensor:
        """``[K, voxels]``: each parcel's weights, summing to 1."""
        return torch.softmax(self.speed * self.logits, dim=1)

    @torch.no_grad()
    def start_as(self, labels: torch.Tensor, outside: float = 10.0) -> None:
        """Restart the parcels as a hard parcellation: `labels` ``[voxels]`` gives each voxel its parcel
        (0..K-1, -1: none). Logit 0 inside a parcel, -`outside` elsewhere: with ~100 voxels per parcel among
        ~10^4, under 1% of a parcel's weight lies outside it at the start, and training may still move it."""
        inside = labels[None, :] == torch.arange(len(self.logits))[:, None]
        if not inside.any(1).all():
            raise InputError("autoencoder3d", "parcels: every parcel needs at least one voxel")
        self.logits.copy_(torch.where(inside, 0.0, -outside) / self.speed)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        pooled = torch.einsum("bcv,kv->bkc", f.flatten(2), self.weights())
        return (pooled * self.mix).sum(-1) + self.bias


class ParcelPaint(nn.Module):
    """``[B, K]`` -> ``[B, C, X, Y, Z]``: each dimension paints its parcel (weights scaled to a peak of 1)
    with a learnt channel vector: a dimension changes only its own part of the reconstruction."""

    def __init__(self, read: ParcelRead, channels: int, in_shape):
        super().__init__()
        self.logits, self.shape = read.logits, tuple(in_shape)   # the same Parameter: one set of parcels
        self.colour = nn.Parameter(torch.randn(len(read.logits), channels) / math.sqrt(len(read.logits)))

    def weights(self) -> torch.Tensor:
        """``[K, voxels]``: each parcel's weights scaled to a peak of 1."""
        w = torch.softmax(ParcelRead.speed * self.logits, dim=1)
        return w / w.amax(1, keepdim=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        w = self.weights()
        # (codes x colours) @ parcels: einsum's left-to-right order would build a [B, K, voxels] product first
        return ((z[:, :, None] * self.colour).transpose(1, 2) @ w).reshape(len(z), -1, *self.shape)


def _enough_voxels(mask, k: int) -> None:
    n = int(torch.as_tensor(mask, dtype=torch.bool).sum())
    if n < k:
        raise InputError("autoencoder3d", f"parcels: {k} latent dimensions need at least {k} brain voxels, the mask has {n}")


def parcel_centres_in(mask, k: int, seed: int = 0) -> list[list[float]]:
    """K voxel coordinates spread evenly over a brain mask (k-means of its voxels' coordinates): where the
    `parcels` bottleneck's dimensions start. The trainer passes them, computed from its brain mask."""
    from sklearn.cluster import KMeans

    _enough_voxels(mask, k)
    points = torch.nonzero(torch.as_tensor(mask)).double().numpy()
    return KMeans(k, n_init=1, random_state=seed).fit(points).cluster_centers_.round(3).tolist()


def ward_parcels(maps: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """``[voxels]`` parcel of every grid voxel (-1 outside `mask`): Ward clustering of the brain voxels of
    `maps` ``[subjects, X, Y, Z]`` with the grid's neighbours as connectivity (scikit-learn's
    FeatureAgglomeration): K spatially connected parcels, each of voxels that vary together over the
    subjects (a data-driven parcellation; Thirion et al. 2014, Front. Neurosci. 8:167). Pass training
    subjects only: the parcellation is fitted, like the network."""
    from sklearn.cluster import FeatureAgglomeration
    from sklearn.feature_extraction.image import grid_to_graph

    m = torch.as_tensor(mask, dtype=torch.bool)
    _enough_voxels(m, k)
    x = maps[:, m].double().numpy()
    connectivity = grid_to_graph(*m.shape, mask=m.numpy())
    labels = torch.full((m.numel(),), -1, dtype=torch.long)
    labels[m.flatten()] = torch.from_numpy(FeatureAgglomeration(n_clusters=k, connectivity=connectivity, linkage="ward")
                                           .fit(x).labels_).long()
    return labels


class Autoencoder3d(_Model):
    """A 3D convolutional autoencoder whose linear latent code is the endophenotype vector.

    Convolutional autoencoders: Masci, Meier, Cireşan & Schmidhuber (2011, ICANN). As image-derived
    phenotypes for GWAS: Patel et al. (2024, Commun. Biol. 7:414; "UDIPs", a 3D convolutional
    autoencoder with a 128-dimensional linear latent, trained with MSE inside the brain mask).

    `bottleneck: dense` (default). Encoder: per width a Conv3d(3³, stride 2, padding 1) -> BatchNorm3d ->
    ReLU (each axis n -> ceil(n/2)), Flatten, Linear(latent) without activation. Decoder, mirrored: Linear
    -> ReLU -> reshape, per width a ConvTranspose3d(3³, stride 2) -> BatchNorm3d -> ReLU (each axis
    doubles), a last Conv3d(3³) to `in_channels` without activation, cropped to `in_shape` (doubling
    ceil(n/2) repeatedly never falls short of n, so cropping is always enough).

    `bottleneck: parcels`: every latent dimension is tied to a soft parcel of the grid. Encoder: per width
    a Conv3d(3³, padding 1) -> BatchNorm3d -> ReLU at full resolution, then each dimension a channel mix
    of its parcel's weighted mean of those features (`ParcelRead`). Decoder, mirrored: each dimension
    paints its parcel (`ParcelPaint`), then Conv3d -> ReLU -> Conv3d to `in_channels`. The parcels are
    learnt with the rest, started as Gaussian bumps of SD `parcel_width` voxels around `parcel_centres`
    (`parcel_centres_in(brain_mask, latent)`; the trainer passes them). Why: a dense code spends its
    dimensions on the brain-wide variation, and each dimension mixes every region, so a GWAS per
    dimension finds no small region's locus; a parcel code is a learnt, soft parcellation of the
    kind that does (Ward parcels of the same maps; Thirion et al. 2014). Its untrained copy has the
    starting bumps and random features. With `parcels: ward` the trainer restarts the parcels, before
    training, as a Ward parcellation of the training subjects' input maps (`ward_parcels`,
    `ParcelRead.start_as`): parcels of voxels that vary together, as a small region's voxels do, instead
    of bumps placed by geometry alone (on the phantom: 3 planted loci trained for 8 epochs; 2, at weaker p,
    from the bumps trained for 20; the untrained copy keeps the bumps). BENCHMARKS.md, "A parcel bottleneck", "Parcels that start as a Ward parcellation".

    The loss (MSE inside the brain mask) is computed by the trainer.

    Parameters
    ----------
    in_shape, in_channels : as `CNN3d`. n_outputs : accepted and ignored (`build` passes it).
    latent : size of the code (`embedding_dim`). widths : filters of the encoder blocks.
    bottleneck : ``"dense"`` or ``"parcels"``. parcel_centres : ``latent`` voxel coordinates (parcels
    only; default: k-means of the whole grid). parcel_width : SD of the starting bumps, in voxels.

    `target_layer`: the last encoder Conv3d (Grad-CAM of a latent unit).
    """

    name = "autoencoder3d"

    def __init__(self, in_shape, in_channels: int = 1, n_outputs: int | None = None, latent: int = 128,
                 widths=(16, 32, 64), bottleneck: str = "dense", parcel_centres=None, parcel_width: float = 2.0):
        super().__init__()
        n = self.name
        in_shape, widths = _shape3(n, in_shape), _ints(n, "widths", widths)
        if bottleneck not in ("dense", "parcels"):
            raise InputError(n, f"bottleneck {bottleneck!r}: dense or parcels")
        latent = _positive(n, "latent", latent)
        self.config = dict(in_shape=in_shape, in_channels=_positive(n, "in_channels", in_channels),
                           latent=latent, widths=widths, bottleneck=bottleneck)
        self.embedding_dim = latent
        if bottleneck == "parcels":
            if parcel_centres is None:
                parcel_centres = parcel_centres_in(torch.ones(in_shape, dtype=torch.bool), latent)
            parcel_centres = [[float(c) for c in p] for p in parcel_centres]
            if len(parcel_centres) != latent or any(len(p) != 3 for p in parcel_centres):
                raise InputError(n, f"parcel_centres: {latent} voxel coordinates (x, y, z) expected")
            self.config.update(parcel_centres=parcel_centres, parcel_width=float(parcel_width))
            layers, c = [], in_channels
            for w in widths:
                layers += [nn.Conv3d(c, w, 3, padding=1), nn.BatchNorm3d(w), nn.ReLU()]
                c = w
            read = ParcelRead(_bumps(in_shape, parcel_centres, float(parcel_width)), c)
            self.encoder = nn.Sequential(*layers, read)
            self.expand = ParcelPaint(read, c, in_shape)
            self.decoder = nn.Sequential(nn.Conv3d(c, c, 3, padding=1), nn.ReLU(), nn.Conv3d(c, in_channels, 3, padding=1))
            return
        layers, c, shape = [], in_channels, list(in_shape)
        for w in widths:
            layers += [nn.Conv3d(c, w, 3, stride=2, padding=1), nn.BatchNorm3d(w), nn.ReLU()]
            c, shape = w, [math.ceil(s / 2) for s in shape]
        self.code_shape = (c, *shape)
        self.encoder = nn.Sequential(*layers, nn.Flatten(), nn.Linear(math.prod(self.code_shape), latent))
        self.expand = nn.Sequential(nn.Linear(latent, math.prod(self.code_shape)), nn.ReLU())
        layers = []
        for w in (*widths[-2::-1], widths[0]):                   # (16, 32, 64) -> 32, 16, 16
            layers += [nn.ConvTranspose3d(c, w, 3, stride=2, padding=1, output_padding=1), nn.BatchNorm3d(w), nn.ReLU()]
            c = w
        self.decoder = nn.Sequential(*layers, nn.Conv3d(c, in_channels, 3, padding=1))

    @property
    def target_layer(self) -> nn.Module:
        return _last(self.encoder, nn.Conv3d)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, latent]``: the linear latent code."""
        self._check(x)
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, C, X, Y, Z]``: the reconstruction of a code."""
        if self.config["bottleneck"] == "parcels":
            return self.decoder(self.expand(z))
        x, y, zz = self.config["in_shape"]
        return self.decoder(self.expand(z).reshape(-1, *self.code_shape))[:, :, :x, :y, :zz]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


# ---- registry ------------------------------------------------------------------------------------

ARCHITECTURES: dict[str, type] = {cls.name: cls for cls in (CNN3d, PatchNet, SliceNet, Inception3d, InceptionResNet3d,
                                                            Autoencoder3d)}


def build(name: str, in_shape: tuple[int, int, int], in_channels: int = 1, n_outputs: int = 2,
          **options) -> nn.Module:
    """The network registered as `name`, built for inputs ``[B, in_channels, *in_shape]``.

    `options` are the class's other keyword arguments (see each class); ``build(name, **model.config)``
    rebuilds a model (then ``load_state_dict``). Unknown names and options raise `InputError`, listing
    the known ones.
    """
    cls = ARCHITECTURES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise InputError(name, f"unknown architecture; known: {', '.join(ARCHITECTURES)}")
    known = [p for p in inspect.signature(cls.__init__).parameters
             if p not in ("self", "in_shape", "in_channels", "n_outputs")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise InputError(name, f"unknown option(s) {', '.join(unknown)}; known options: "
                               f"in_shape, in_channels, n_outputs, {', '.join(known)}")
    return cls(in_shape, in_channels=in_channels, n_outputs=n_outputs, **options)


def layout_of(net: nn.Module) -> torch.memory_format:
    """The memory layout `net` runs fastest in: channels-last 3D, oneDNN's (and cuDNN's) fast path for
    Conv3d (training: 1.3-1.8x the throughput of cnn3d, 1.35-1.45x that of autoencoder3d on a 2-core CPU;
    the input gradients of integrated gradients 1.76x; BENCHMARKS.md), unless the network holds 2D
    convolutions (slice2d), whose weights that layout cannot hold."""
    return torch.contiguous_format if any(w.dim() == 4 for w in net.parameters()) else torch.channels_last_3d
