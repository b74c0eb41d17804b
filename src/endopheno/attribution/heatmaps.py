"""Voxelwise attribution maps of a `VolumeModel`, and the checks that they are real.

Every method explains one scalar output of ``VolumeModel.forward`` (a class logit, or the regression
output) for each subject of a batch ``x`` ``[B, C, X, Y, Z]`` of un-normalised input maps, and returns a
map of the same shape, on the model's voxel grid (whose MNI position is ``model.affine``):

- ``"integrated_gradients"``: Sundararajan, Taly & Yan (2017, ICML, "Axiomatic attribution for deep
  networks"), captum's `IntegratedGradients`, its path points batched (``internal_batch_size``).
- ``"lrp"``: layer-wise relevance propagation (Bach et al. 2015, PLoS ONE 10:e0130140; rules after
  Montavon, Binder, Lapuschkin, Samek & Müller 2019, "Layer-wise relevance propagation: an overview", in
  *Explainable AI*, LNCS 11700), captum's `LRP` with the rules of `LRP_RULES` (see there).
- ``"guided_gradcam"``: Selvaraju et al. (2017, ICCV), Grad-CAM of the network's target layer(s),
  upsampled to the input grid and multiplied with guided backpropagation (Springenberg et al. 2015),
  from captum's `LayerGradCam` and `GuidedBackprop`. Grad-CAM's ReLU keeps only evidence for the
  explained output: evidence held as features whose loss raises it (healthy tissue, for an AD logit) is
  dropped, and the map then lies beside the atrophy (benchmarks/gradcam_layers.py).
- ``"occlusion"``: Zeiler & Fergus (2014, ECCV), captum's `Occlusion` with a cube window per channel:
  the drop of the output when the cube is replaced by the baseline, averaged over the windows covering
  each voxel.

Böhle, Eitel, Weygandt & Ritter (2019, Front. Aging Neurosci. 11:194) explained a 3D CNN for
Alzheimer's disease with LRP (their β-rule) against guided backpropagation; the issue's comparison
scores all four methods against the phantom's true atrophy map (`endopheno.attribution.score`).

Checks: `completeness` (IG sums to f(x) − f(x′); LRP conserves f(x)), `randomised_copy` and
`rank_correlation` (the model-parameter randomisation test of Adebayo et al. 2018, NeurIPS, "Sanity
checks for saliency maps").
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch
from captum.attr import LRP, GuidedBackprop, IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion
from captum.attr._core.lrp import SUPPORTED_NON_LINEAR_LAYERS
from captum.attr._utils.lrp_rules import EpsilonRule, IdentityRule, PropagationRule
from scipy import ndimage, stats
from torch import nn

from endopheno.errors import InputError
from endopheno.models.architectures import Add, Autoencoder3d, PatchNet, SliceNet, layout_of
from endopheno.models.volume_model import VolumeModel

log = logging.getLogger(__name__)

METHODS = ("integrated_gradients", "lrp", "guided_gradcam", "occlusion")

__all__ = ["LRP_RULES", "METHODS", "MethodNotApplicable", "attribute", "baseline_volume", "completeness",
           "default_target", "randomised_copy", "rank_correlation"]


class MethodNotApplicable(InputError):
    """An attribution method that cannot explain a model. The message names the model, the method and
    the reason, so that a caller running every method on every model reports it and carries on."""

    def __init__(self, model: str, method: str, reason: str):
        self.method = method
        super().__init__(model, f"{method} does not apply: {reason}")


# ---- targets, inputs, baselines --------------------------------------------------------------------

def _name(model: VolumeModel) -> str:
    return getattr(model.net, "name", "") or model.architecture


def default_target(model: VolumeModel) -> int:
    """The output explained by default: the positive class (logit index 1) of a classifier, output 0 of a
    regression."""
    return 1 if model.task == "classification" else 0


def _as_input(model: VolumeModel, x) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=torch.float32)
    if x.ndim != 5 or tuple(x.shape[2:]) != tuple(model.mask.shape):
        raise InputError(_name(model), f"attribution expects input [B, C, {', '.join(map(str, model.mask.shape))}], "
                                       f"got {list(x.shape)}")
    return x.to(model.mask.device)


def baseline_volume(model: VolumeModel, x, baseline="zeros", *, mean_image=None,
                    blur_sigma: float = 2.0) -> torch.Tensor:
    """The reference input x′ of Integrated Gradients and occlusion, un-normalised and shaped like `x`.

    Parameters
    ----------
    baseline :
        - ``"zeros"``: the network's zero input. `VolumeModel` normalises its input with the training
          subjects' channel means and SDs, so the all-zero input of the network, the usual IG baseline
          (Sundararajan et al. 2017), is the volume whose every voxel sits at its channel's training mean
          (``model.mean``). A raw all-zero volume would be −mean/SD in the network's space, an image
          far outside the training data, and the attributions would mostly explain the difference between
          a brain and an empty volume.
        - ``"mean"``: `mean_image` (``[C, X, Y, Z]`` or broadcastable to `x`), e.g. the controls' mean
          image, so that attributions explain what differs from a typical brain.
        - ``"blurred"``: `x` smoothed by a Gaussian of `blur_sigma` voxels in space, channel by channel:
          a reference that keeps the coarse anatomy and removes fine structure (Fong & Vedaldi 2017,
          ICCV; Sturmfels, Lundberg & Lee 2020, Distill, "Visualizing the impact of feature attribution
          baselines").
        - a number: a constant raw intensity everywhere; an array or tensor broadcastable to `x`.
    """
    x = _as_input(model, x)
    if isinstance(baseline, str):
        if baseline == "zeros":
            ref = model.mean.expand_as(x[0]).unsqueeze(0)
        elif baseline == "mean":
            if mean_image is None:
                raise InputError("baseline", "'mean' needs a mean_image")
            ref = torch.as_tensor(mean_image, dtype=torch.float32, device=x.device)
        elif baseline == "blurred":
            sigma = (0, 0, blur_sigma, blur_sigma, blur_sigma)
            ref = torch.from_numpy(ndimage.gaussian_filter(x.cpu().numpy(), sigma, mode="nearest")).to(x.device)
        else:
            raise InputError("baseline", f"unknown baseline {baseline!r}; known: zeros, mean, blurred, a number "
                                         f"or an array")
    else:
        ref = torch.as_tensor(baseline, dtype=torch.float32, device=x.device)
    try:
        return torch.broadcast_to(ref, x.shape).contiguous()
    except RuntimeError:
        raise InputError("baseline", f"shape {list(ref.shape)} does not broadcast to the input "
                                     f"{list(x.shape)}") from None


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (BatchNorm running statistics, no dropout) and the network's fast layout (`layout_of`:
    the input gradients of integrated gradients 1.76x faster on a 2-core CPU) for the duration; the
    caller's mode and the ordinary layout after (a VolumeModel's normalisation buffers stay as they are)."""
    training = model.training
    net = model.net if isinstance(model, VolumeModel) else model
    model.eval()
    net.to(memory_format=layout_of(net))
    try:
        yield model
    finally:
        model.train(training)
        net.to(memory_format=torch.contiguous_format)


# ---- Integrated Gradients --------------------------------------------------------------------------

def _integrated_gradients(model, x, target, baseline, steps, integration, internal_batch_size, tolerance,
                          max_steps):
    """IG with the completeness check Sundararajan et al. (2017, §3) recommend: the attributions must add up
    to f(x) − f(x′), and where they do not within `tolerance`, the number of steps is raised. A ReLU
    network is piecewise linear along the straight path and its gradient piecewise constant, so no
    quadrature is exact and the error shrinks only about as 1/steps; a sharp, well-trained classifier
    can miss 1 % at 50 steps for some subjects. Those subjects (only) are recomputed with twice the
    steps, up to `max_steps`; captum returns the error Σ attr − (f(x) − f(x′)) for two forward passes."""
    ig = IntegratedGradients(model)
    maps, todo, n = torch.empty_like(x), torch.arange(len(x), device=x.device), steps
    while True:
        part, delta = ig.attribute(x[todo], baselines=baseline[todo], target=target, n_steps=n, method=integration,
                                   internal_batch_size=internal_batch_size or steps, return_convergence_delta=True)
        maps[todo] = part.detach()
        total = part.detach().double().flatten(1).sum(1)
        error = delta.double().abs() / (total - delta.double()).abs()
        late = error > tolerance
        if not late.any():
            return maps
        if 2 * n > max_steps:
            log.warning("integrated gradients: completeness error up to %.1f%% of f(x) - f(x') for %d subject(s) "
                        "at %d steps (max_steps)", 100 * error.max().item(), int(late.sum()), n)
            return maps
        todo, n = todo[late], 2 * n
        log.info("integrated gradients: %d subject(s) above %.1f%% completeness error, %d steps", len(todo),
                 100 * tolerance, n)


# ---- LRP ---------------------------------------------------------------------------------------------

def _epsilon() -> PropagationRule:
    return EpsilonRule(epsilon=1e-9)


LRP_RULES: dict[type[nn.Module], Callable[[], PropagationRule]] = {
    nn.Linear: _epsilon, nn.Conv1d: _epsilon, nn.Conv2d: _epsilon, nn.Conv3d: _epsilon,
    nn.MaxPool1d: _epsilon, nn.MaxPool2d: _epsilon, nn.MaxPool3d: _epsilon,
    nn.AdaptiveMaxPool2d: _epsilon, nn.AdaptiveMaxPool3d: _epsilon,
    nn.AvgPool2d: _epsilon, nn.AvgPool3d: _epsilon, nn.AdaptiveAvgPool2d: _epsilon, nn.AdaptiveAvgPool3d: _epsilon,
    nn.BatchNorm1d: IdentityRule, nn.BatchNorm2d: IdentityRule, nn.BatchNorm3d: IdentityRule,
    nn.Identity: _epsilon, nn.LeakyReLU: IdentityRule, nn.Flatten: _epsilon, Add: _epsilon,
}
"""LRP rule factory per layer type, assigned as ``module.rule`` (captum's documented way of choosing
rules); looked up along the class hierarchy, so subclasses inherit their parent's rule.

- Conv1d/2d/3d, Linear: LRP-ε, z_ij = a_i w_ij, R_i = Σ_j z_ij / (z_j + ε·sign z_j) · R_j, with a tiny
  ε (1e-9, captum's default): the basic rule, which conserves relevance except for what the biases
  absorb. Montavon et al. (2019, §10.2) recommend a composite: LRP-0 for the upper dense layers, a
  larger ε in the middle, LRP-γ in the lower convolutions (``captum.attr._utils.lrp_rules.GammaRule``);
  Böhle et al. (2019) used the β-rule (``Alpha1_Beta0_Rule`` is its β = 0 case). Those rules assume
  non-negative inputs, which the first layer (a normalised MRI, of both signs) does not have, and they
  are chosen by depth, not type: pass another registry to `attribute` (``rules=``) to use them.
- MaxPool (all of them, ceil_mode and padding included), AdaptiveMaxPool: ε-rule, which with z = the
  maximum sends all relevance to the winning input (winner-take-all, Montavon et al. 2019).
- AvgPool, AdaptiveAvgPool: ε-rule, i.e. relevance shared in proportion to each input's contribution
  a_i / N to the mean.
- BatchNorm: folded into the convolution before it ("canonisation": the network is copied, the BN's
  eval-mode affine map merged into the convolution's weights and bias, the BN removed), so that the
  ε-rule of the convolution sees the true pre-activation and the BN's shift counts as a bias. A
  BatchNorm that cannot be folded (not directly after a convolution) passes relevance unchanged
  (captum's `IdentityRule`, which its documentation names for BatchNorm).
- LeakyReLU: identity (`IdentityRule`), as captum treats ReLU: an element-wise activation that keeps the
  sign of its input redistributes nothing (Montavon et al. 2019 propagate relevance only through the
  linear layers).
- Flatten, Identity: the ε-rule on a reshape or identity returns R·a/(a + ε·sign a) = R. captum's
  `IdentityRule` cannot serve: it hands back the output's relevance tensor as it is, whose shape a
  reshape changes, and `nn.Identity` returns its input tensor itself, whose input hook then runs before
  the output hook that `IdentityRule` reads.
- `Add` (a residual sum, architectures.py): the ε-rule, R_a = a / (a + b) · R, relevance shared between
  the summands in proportion to their contributions (captum's `Addition_Module` gets the same rule).
- ReLU, Dropout (and Tanh): absent here on purpose: captum propagates relevance through its own list of
  non-linear layers unchanged (identity), and gives them no rule.
"""

_HEATMAPS_NOT_APPLICABLE = ("its output is a reconstruction volume, not a score to explain; map its latent "
                            "dimensions by perturbation and decoding instead")


def _lrp_obstacle(net: nn.Module) -> str | None:
    """Why captum's LRP cannot propagate relevance through `net` correctly, or None.

    captum's LRP runs on autograd: a rule divides the relevance by its layer's output and multiplies the
    gradient at its input by the input. Operations outside any module get plain gradients, which is right
    for reshaping, slicing and concatenation (relevance is routed, not changed) but not for an addition
    of two branches (each summand receives the whole relevance, instead of its share) or a learned
    pooling (the gradient of a mean or softmax gate is not the share of each term). Residual sums are
    modules (`Add`) in the registry's networks for this reason.
    """
    if isinstance(net, SliceNet):
        return ("it pools the slice embeddings (mean or gated attention) and adds position embeddings with "
                "tensor operations outside any module, which LRP cannot redistribute")
    return None


def _fold_batchnorm(net: nn.Module) -> None:
    """Merge every BatchNorm that directly follows a convolution in an `nn.Sequential` into that
    convolution's weights and bias, and remove it (eval-mode statistics; `net` must be a copy)."""
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    for seq in [m for m in net.modules() if isinstance(m, nn.Sequential)]:
        folded = []
        for i in range(1, len(seq)):
            conv, bn = seq[i - 1], seq[i]
            if not (isinstance(conv, nn.modules.conv._ConvNd) and not conv.transposed and isinstance(bn, norms)
                    and bn.track_running_stats):
                continue
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.affine:
                scale = scale * bn.weight
            shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
            with torch.no_grad():
                conv.weight.mul_(scale.reshape(-1, *[1] * (conv.weight.ndim - 1)))
                bias = shift if conv.bias is None else conv.bias * scale + shift
                conv.bias = nn.Parameter(bias.detach().clone())
            folded.append(i)
        for i in reversed(folded):
            del seq[i]


def _rule_for(layer: nn.Module, rules: Mapping) -> Callable[[], PropagationRule] | None:
    return next((rules[cls] for cls in type(layer).__mro__ if cls in rules), None)


def _lrp_network(model: VolumeModel, rules: Mapping) -> nn.Module:
    """A copy of the model's network, BatchNorm folded, every leaf module given its rule."""
    name = _name(model)
    obstacle = _lrp_obstacle(model.net)
    if obstacle:
        raise MethodNotApplicable(name, "lrp", obstacle)
    net = copy.deepcopy(model.net).eval()
    _fold_batchnorm(net)
    for layer in net.modules():
        # captum collects the leaf modules; those in its own non-linear list (ReLU, Dropout, Tanh) get its
        # identity backward hook and must have no rule. Every other leaf needs a `.rule` (captum raises
        # otherwise): assigning it is captum's public hook, so captum's supported lists stay untouched.
        if list(layer.children()) or type(layer) in SUPPORTED_NON_LINEAR_LAYERS:
            continue
        factory = _rule_for(layer, rules)
        if factory is None:
            raise MethodNotApplicable(name, "lrp", f"no LRP rule for layer type {type(layer).__name__} "
                                                   f"(add one to the rule registry)")
        layer.rule = factory()
    return net


def _lrp(model, x, target, rules):
    # Relevance is propagated to the network's own (normalised) input: normalisation is voxelwise, so the
    # relevance of normalised voxel v is the relevance of input voxel v, whereas a chain-rule step
    # through it would scale relevance by mask/SD and break conservation. A model with `highpass_voxels`
    # reads each voxel's contrast with its surroundings: the relevance of v is then that contrast's.
    net = _lrp_network(model, rules)
    return LRP(net).attribute(model.normalise(x).detach().requires_grad_(), target=target)


# ---- Guided Grad-CAM ---------------------------------------------------------------------------------

def _target_layer(net: nn.Module) -> nn.Module:
    """The network's Grad-CAM layer (`target_layer` of the registry's models: the last Conv3d; for the
    inception models the last inception module, the concatenation of all its paths), else its last
    Conv3d."""
    layer = getattr(net, "target_layer", None)
    if layer is None:
        convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
        if not convs:
            raise MethodNotApplicable(getattr(net, "name", type(net).__name__), "guided_gradcam",
                                      "the network has no convolutional layer")
        layer = convs[-1]
    return layer


def _gradcam(model: VolumeModel, x: torch.Tensor, target: int, mode: str) -> torch.Tensor:
    """Grad-CAM [B, C, X, Y, Z]: each target layer's map (ReLU of the gradient-weighted channel sum,
    Selvaraju et al. 2017) upsampled to the part of the input that layer sees.

    Most networks have one target layer that sees the whole volume. A `PatchNet` branch sees one box of
    the grid, an `Inception3d` branch one input channel: each map is placed there. A `SliceNet` layer runs
    on every slice (batch B·S): its maps are upsampled in plane and stacked along the slice axis.
    """
    net = model.net
    if isinstance(net, SliceNet):
        local = LayerGradCam(model, net.target_layer).attribute(x, target=target, relu_attributions=True)
        axis = net.config["axis"]
        plane = [n for i, n in enumerate(x.shape[2:]) if i != axis]
        local = LayerAttribution.interpolate(local, tuple(plane), "bilinear" if mode == "trilinear" else mode)
        return local.reshape(len(x), -1, 1, *plane).movedim(1, 2 + axis).expand_as(x)
    everything = (slice(None),) * 3
    if isinstance(net, PatchNet):
        regions = [(layer, slice(None), box) for layer, box in zip(net.target_layers, net.boxes)]
    elif hasattr(net, "target_layers"):                        # Inception3d: one branch per input channel
        regions = [(layer, slice(c, c + 1), everything) for c, layer in enumerate(net.target_layers)]
    else:
        regions = [(_target_layer(net), slice(None), everything)]
    cam = torch.zeros_like(x)
    for layer, channels, box in regions:
        local = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
        size = tuple(len(range(*s.indices(n))) for s, n in zip(box, x.shape[2:]))
        cam[(slice(None), channels, *box)] = LayerAttribution.interpolate(local, size, mode)
    return cam


def _guided_gradcam(model, x, target, mode):
    # captum's GuidedGradCam does the same for one layer that sees the whole input; composing its parts
    # lets patch, per-channel and per-slice layers be placed where they belong.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Setting backward hooks on ReLU", UserWarning)  # captum's notice
        guided = GuidedBackprop(model).attribute(x.detach().requires_grad_(), target=target)
    return guided * _gradcam(model, x, target, mode)


# ---- occlusion ---------------------------------------------------------------------------------------

def _occlusion(model, x, target, baseline, window, stride, perturbations_per_eval):
    return Occlusion(model).attribute(x, sliding_window_shapes=(1, window, window, window),
                                      strides=(1, stride, stride, stride), baselines=baseline, target=target,
                                      perturbations_per_eval=perturbations_per_eval)


# ---- dispatch ----------------------------------------------------------------------------------------

def attribute(model: VolumeModel, x, method: str, *, target: int | None = None, baseline="zeros",
              mean_image=None, blur_sigma: float = 2.0, steps: int = 50, integration: str = "gausslegendre",
              internal_batch_size: int | None = None, tolerance: float = 0.01, max_steps: int = 800,
              rules: Mapping | None = None, window: int = 4, stride: int = 2, perturbations_per_eval: int = 16,
              interpolation: str = "trilinear") -> np.ndarray:
    """Attribution maps ``[B, C, X, Y, Z]`` (float32) of `model`'s output `target` for the inputs `x`.

    Parameters
    ----------
    model : a `VolumeModel`; it runs in eval mode (its mode is restored afterwards).
    x : ``[B, C, X, Y, Z]`` un-normalised input maps on the model's grid (as ``VolumeDataset.volume``).
    method : one of `METHODS`.
    target : the output explained; default `default_target` (class 1 of a classifier, output 0 of a
        regression).
    baseline, mean_image, blur_sigma : the reference input of IG and occlusion (`baseline_volume`);
        occlusion fills the window with the baseline's voxels (default: the training mean, i.e. zero in
        the network's space).
    steps, integration, internal_batch_size : IG's path points, captum's quadrature ("gausslegendre",
        "riemann_trapezoid", ...), and how many path points (× subjects) run per forward pass (default:
        `steps`, one subject's whole path at once). Gauss–Legendre (captum's default) missed 1 % for
        fewer subjects than the equally spaced rules at 50 steps (on a small trained CNN: 1 of 8, against
        7 of 8 for "riemann_trapezoid" and 2 of 8 for "riemann_middle").
    tolerance, max_steps : subjects whose IG misses completeness by more than `tolerance` (relative) are
        recomputed with doubled steps, up to `max_steps` (`_integrated_gradients`).
    rules : LRP rule registry (type → rule factory), default `LRP_RULES`.
    window, stride : occlusion cube side and step in voxels (default 4 and 2: each voxel lies in about
        2³ windows, whose effects are averaged); `perturbations_per_eval` occluded copies per forward pass.
    interpolation : upsampling of Grad-CAM to the input grid ("trilinear", as Grad-CAM's bilinear in 2D,
        or "nearest").

    Raises
    ------
    MethodNotApplicable : the method cannot explain this model (the autoencoder, whose output is a volume,
        for every method; LRP for residual and slice-pooling networks), with the reason.
    """
    if method not in METHODS:
        raise InputError(method, f"unknown attribution method; known: {', '.join(METHODS)}")
    name = _name(model)
    if isinstance(model.net, Autoencoder3d) or model.task == "reconstruction":
        raise MethodNotApplicable(name, method, _HEATMAPS_NOT_APPLICABLE)
    x = _as_input(model, x)
    target = default_target(model) if target is None else int(target)
    started = time.perf_counter()
    with _evaluating(model):
        if method == "integrated_gradients":
            ref = baseline_volume(model, x, baseline, mean_image=mean_image, blur_sigma=blur_sigma)
            maps = _integrated_gradients(model, x, target, ref, steps, integration, internal_batch_size,
                                         tolerance, max_steps)
        elif method == "lrp":
            maps = _lrp(model, x, target, LRP_RULES if rules is None else rules)
        elif method == "guided_gradcam":
            maps = _guided_gradcam(model, x, target, interpolation)
        else:
            ref = baseline_volume(model, x, baseline, mean_image=mean_image, blur_sigma=blur_sigma)
            maps = _occlusion(model, x, target, ref, window, stride, perturbations_per_eval)
    log.info("%s of %s, output %d, %d subject(s): %.2f s", method, name, target, len(x),
             time.perf_counter() - started)
    return maps.detach().cpu().numpy().astype(np.float32)


# ---- checks ------------------------------------------------------------------------------------------

def completeness(model: VolumeModel, x, attributions, baseline="zeros", target: int | None = None, *,
                 mean_image=None, blur_sigma: float = 2.0) -> np.ndarray:
    """Relative completeness error per subject, ``|Σ attr − (f(x) − f(x′))| / |f(x) − f(x′)|``.

    Integrated Gradients satisfies completeness exactly in the limit of infinitely many steps
    (Sundararajan et al. 2017, Proposition 1); the error measures the quadrature. With ``baseline=None``
    f(x′) is taken as 0, which checks LRP's conservation Σ R = f(x) (Bach et al. 2015): exact for the ε
    → 0 rules when the layers have no biases, approximate otherwise (biases and ε absorb relevance).
    `baseline`, `mean_image`, `blur_sigma` as in `baseline_volume`; `target` as in `attribute`.
    """
    x = _as_input(model, x)
    target = default_target(model) if target is None else int(target)
    total = np.asarray(attributions, dtype=np.float64).reshape(len(x), -1).sum(axis=1)
    with torch.no_grad(), _evaluating(model):
        fx = model(x)[:, target].double().cpu().numpy()
        if baseline is None:
            f0 = np.zeros_like(fx)
        else:
            ref = baseline_volume(model, x, baseline, mean_image=mean_image, blur_sigma=blur_sigma)
            f0 = model(ref)[:, target].double().cpu().numpy()
    return np.abs(total - (fx - f0)) / np.abs(fx - f0)


def randomised_copy(model: VolumeModel, seed: int, *, top: int | None = None) -> VolumeModel:
    """A copy of `model` whose network weights are re-initialised (the model-parameter randomisation test
    of Adebayo et al. 2018, "Sanity checks for saliency maps").

    Each parametrised leaf module (Conv, Linear, BatchNorm — whose running statistics are reset too) is
    re-drawn with its own ``reset_parameters`` (PyTorch's default initialisation). ``top=None``
    re-initialises all of them at once (the end point of Adebayo et al.'s cascade); ``top=k`` the k last
    in module order, i.e. the cascade from the output layer down to depth k. Normalisation, mask and
    affine are kept. Parameters held directly by a container (SliceNet's position embedding) are kept.
    The global random state is left as it was.
    """
    copied = copy.deepcopy(model)
    layers = [m for m in copied.net.modules()
              if hasattr(m, "reset_parameters") and not list(m.children()) and list(m.parameters(recurse=False))]
    chosen = layers if top is None else layers[len(layers) - min(top, len(layers)):]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in chosen:
            layer.reset_parameters()
    log.info("randomised %d of %d layers of %s (seed %d)", len(chosen), len(layers), _name(model), seed)
    return copied


def rank_correlation(map_a, map_b, mask, *, absolute: bool = False) -> float:
    """Spearman rank correlation of two maps over the voxels inside `mask` (``[X, Y, Z]``, broadcast over
    any leading axes of the maps), as Adebayo et al. (2018) compare a model's map with its randomised
    copy's; ``absolute`` ranks magnitudes, as their "absolute value" variant. NaN when either map is
    constant inside the mask (e.g. a Grad-CAM that the ReLU zeroes everywhere)."""
    a, b = np.asarray(map_a, dtype=np.float64), np.asarray(map_b, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError("rank_correlation", f"maps differ in shape: {a.shape} vs {b.shape}")
    inside = np.broadcast_to(np.asarray(mask) > 0, a.shape)
    a, b = a[inside], b[inside]
    if absolute:
        a, b = np.abs(a), np.abs(b)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")                                      # a constant map has no ranking
    return float(stats.spearmanr(a, b)[0])
