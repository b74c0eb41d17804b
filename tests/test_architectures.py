"""The model architectures: shapes, gradients, config round-trip, patch grid, LRP-friendliness."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from endopheno.errors import InputError
from endopheno.models.architectures import (ARCHITECTURES, Add, InceptionModule3d, PatchNet, build, parcel_centres_in, patch_grid,
                                              ward_parcels)

SHAPE = (19, 23, 21)  # odd and all different, so a transposed axis or a dropped row shows
NAMES = ["cnn3d", "patch27", "slice2d", "inception3d", "inception_resnet3d", "autoencoder3d"]
# Small variants that switch on every optional path (attention, position embedding, dropout, another axis).
VARIANTS = [(name, {}) for name in NAMES] + [
    ("slice2d", {"pooling": "attention", "position_encoding": True, "axis": 0, "dropout": 0.3}),
    ("patch27", {"patches": (13, 0, 26)}),
    ("inception3d", {"residual": True, "modules": 1, "width": 4}),
    ("cnn3d", {"widths": (4, 6), "kernels": (4, 3), "dropout": 0.5}),  # an even kernel
]
ALLOWED = (nn.Conv3d, nn.Conv2d, nn.BatchNorm3d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool3d, nn.MaxPool2d,
           nn.AdaptiveAvgPool3d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear, nn.Dropout, nn.ConvTranspose3d,
           Add)   # the residual sum as a module, so that LRP shares its relevance


def ident(value):
    return f"{value[0]}-{'-'.join(f'{k}={v}' for k, v in value[1].items())}" if isinstance(value, tuple) else None


def volume(channels: int, shape=SHAPE, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, *shape, generator=torch.Generator().manual_seed(seed))


def leaves(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if not list(m.children())]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_shapes(name, channels):
    model = build(name, SHAPE, in_channels=channels, n_outputs=3)
    x = volume(channels)
    out, emb = model(x), model.embed(x)
    assert emb.shape == (2, model.embedding_dim)
    if name == "autoencoder3d":
        assert out.shape == x.shape
        assert model.encode(x).shape == (2, 128) and model.decode(emb).shape == x.shape
    else:
        assert out.shape == (2, 3)
    assert model.name == name and ARCHITECTURES[name] is type(model)
    assert any(model.target_layer is m for m in model.modules())


def test_embedding_sizes():
    assert build("cnn3d", SHAPE, hidden=10).embedding_dim == 10
    assert build("patch27", SHAPE, hidden=5, patches=(1, 2)).embedding_dim == 10
    assert build("slice2d", SHAPE, hidden=7).embedding_dim == 7
    assert build("inception3d", SHAPE, in_channels=2, hidden=9, width=4).embedding_dim == 9
    assert len(build("inception3d", SHAPE, in_channels=2).branches) == 2  # one branch per input map
    assert build("autoencoder3d", SHAPE, latent=6).embedding_dim == 6


@pytest.mark.parametrize("shape", [(19, 23, 21), (16, 20, 18), (9, 5, 7), (1, 3, 2)])
def test_autoencoder_reconstruction_has_input_shape(shape):
    model = build("autoencoder3d", shape, in_channels=2, latent=8, widths=(4, 8))
    x = volume(2, shape)
    assert model(x).shape == x.shape


@pytest.mark.parametrize("variant", VARIANTS, ids=ident)
def test_gradient_reaches_first_layer(variant):
    name, options = variant
    model = build(name, SHAPE, in_channels=2, **options)
    out = model(volume(2))
    (out ** 2).mean().backward()
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv3d, nn.Conv2d)))
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", VARIANTS, ids=ident)
def test_config_round_trip(variant):
    name, options = variant
    model = build(name, SHAPE, in_channels=2, n_outputs=3, **options)
    x = volume(2)
    model.train()
    model(x)  # move the BatchNorm running statistics away from their initial values
    model.eval()
    config = json.loads(json.dumps(model.config))  # plain and JSON-able (as MLflow stores it): lists for tuples
    again = build(name, **config)
    assert again.config == model.config
    again.load_state_dict(model.state_dict())
    again.eval()
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
        assert torch.equal(model.embed(x), again.embed(x))
    fresh = build(name, **config).eval()
    with torch.no_grad():
        assert not torch.equal(model(x), fresh(x))  # the round trip is not trivially true


def test_inception_resnet_is_residual():
    plain, resnet = build("inception3d", SHAPE), build("inception_resnet3d", SHAPE)
    assert "residual" not in resnet.config and plain.config["residual"] is False
    assert all(m.projection is not None for m in resnet.modules() if isinstance(m, InceptionModule3d))
    assert all(m.projection is None for m in plain.modules() if isinstance(m, InceptionModule3d))


@pytest.mark.parametrize("shape", [(19, 23, 21), (3, 4, 5), (27, 28, 30)])
def test_patch_grid_partitions_the_volume(shape):
    boxes = patch_grid(shape)
    assert len(boxes) == 27
    cover = np.zeros(shape, int)
    for box in boxes:
        cover[box] += 1
    assert (cover == 1).all()
    for axis in range(3):
        sizes = {box[axis].stop - box[axis].start for box in boxes}
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert boxes[13] == tuple(patch_grid(shape)[13])  # deterministic; 13 is the centre
    assert all(boxes[13][a].start > 0 and boxes[13][a].stop < shape[a] for a in range(3))


def test_patch_grid_rejects_too_fine_a_grid():
    with pytest.raises(InputError):
        patch_grid((2, 5, 5))


def test_patch_branch_sees_its_patch():
    """A branch's features change when its own patch changes and not when another patch does."""
    model = build("patch27", SHAPE, patches=(4,)).eval()
    x = volume(1)
    inside, outside = x.clone(), x.clone()
    box = patch_grid(SHAPE)[4]
    inside[(slice(None), slice(None), *box)] += 1.0
    outside[(slice(None), slice(None), *patch_grid(SHAPE)[5])] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model.embed(x), model.embed(inside))
        assert torch.equal(model.embed(x), model.embed(outside))
    assert model.branch_index == (4,) and model.boxes == [box]


def test_from_branches_copies_the_single_patch_models():
    x = volume(2, batch=3)
    singles = []
    for i in (13, 0, 7):
        m = build("patch27", SHAPE, in_channels=2, patches=(i,), hidden=6, widths=(4, 8), kernels=(3, 3))
        m.train()
        m(x)  # BatchNorm statistics that differ from a fresh model's
        singles.append(m.eval())
    combined = PatchNet.from_branches(singles, n_outputs=4).eval()
    assert combined.branch_index == (13, 0, 7) and combined.config["patches"] == (13, 0, 7)
    assert combined(x).shape == (3, 4)
    with torch.no_grad():
        expected = torch.cat([m.embed(x) for m in singles], dim=1)
        assert torch.equal(combined.embed(x), expected)
    # copies, not shared tensors: training the combined model leaves the single models alone
    with torch.no_grad():
        next(combined.branches[0].parameters()).add_(1.0)
    assert not torch.equal(next(combined.branches[0].parameters()), next(singles[0].branches[0].parameters()))


def test_from_branches_rejects_mismatched_models():
    a = build("patch27", SHAPE, patches=(1,), hidden=6)
    with pytest.raises(InputError, match="hidden"):
        PatchNet.from_branches([a, build("patch27", SHAPE, patches=(2,), hidden=7)])
    with pytest.raises(InputError, match="distinct"):
        PatchNet.from_branches([a, build("patch27", SHAPE, patches=(1,), hidden=6)])


@pytest.mark.parametrize("variant", VARIANTS, ids=ident)
def test_every_module_runs_exactly_once(variant):
    """captum's LRP and guided backprop hook modules: a module used twice (or never) would break them."""
    name, options = variant
    model = build(name, SHAPE, in_channels=2, **options)
    calls = {id(m): 0 for m in leaves(model)}
    hooks = [m.register_forward_hook(lambda mod, i, o: calls.__setitem__(id(mod), calls[id(mod)] + 1))
             for m in leaves(model)]
    model(volume(2))
    for h in hooks:
        h.remove()
    assert set(calls.values()) == {1}, {type(m).__name__: calls[id(m)] for m in leaves(model)}


@pytest.mark.parametrize("variant", VARIANTS, ids=ident)
def test_layers_are_lrp_friendly(variant):
    name, options = variant
    model = build(name, SHAPE, in_channels=2, **options)
    gate = (nn.Tanh, nn.Sigmoid) if options.get("pooling") == "attention" else ()
    for m in leaves(model):
        assert isinstance(m, ALLOWED + gate), type(m)
        if isinstance(m, nn.ReLU):
            assert not m.inplace
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len({id(m) for m in relus}) == len(relus) > 0


@pytest.mark.parametrize("variant", VARIANTS, ids=ident)
def test_target_layer_is_the_last_convolution_of_embed(variant):
    name, options = variant
    model = build(name, SHAPE, in_channels=2, **options)
    kind = InceptionModule3d if name.startswith("inception") else (nn.Conv3d, nn.Conv2d)
    order = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod)) for m in model.modules()
             if isinstance(m, kind)]
    model.embed(volume(2))
    for h in hooks:
        h.remove()
    assert order[-1] is model.target_layer
    if hasattr(model, "target_layers"):
        assert len(model.target_layers) == len(model.branches)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_slice_attention_weights_sum_to_one(axis, pooling):
    model = build("slice2d", SHAPE, in_channels=2, axis=axis, pooling=pooling, widths=(4, 8), hidden=8)
    model(volume(2, batch=3))
    a = model.last_attention
    assert a.shape == (3, SHAPE[axis])
    assert torch.allclose(a.sum(dim=1), torch.ones(3)) and (a >= 0).all()
    if pooling == "attention":
        assert a.std() > 0  # not uniform by construction


def test_slice_axis_orders_slices():
    """Slices are taken along the requested axis: changing one slice changes only that slice's embedding."""
    model = build("slice2d", SHAPE, axis=1, widths=(4,), hidden=8).eval()
    x = volume(1)
    y = x.clone()
    y[:, :, :, 5, :] += 1.0
    with torch.no_grad():
        diff = (model.slice_embeddings(x) - model.slice_embeddings(y)).abs().sum(dim=(0, 2))
    assert diff.shape == (SHAPE[1],) and diff[5] > 0 and diff.sum() == diff[5]


def test_unknown_name_or_option_raises():
    with pytest.raises(InputError, match="cnn3d") as err:
        build("resnet", SHAPE)
    assert err.value.what == "resnet" and all(n in str(err.value) for n in NAMES)
    with pytest.raises(InputError, match="hidden") as err:
        build("cnn3d", SHAPE, hiden=3)
    assert "hiden" in str(err.value)
    with pytest.raises(InputError):
        build("inception_resnet3d", SHAPE, residual=False)  # fixed by the name
    with pytest.raises(InputError):
        build("slice2d", SHAPE, pooling="max")
    with pytest.raises(InputError):
        build("cnn3d", (19, 23))
    with pytest.raises(InputError):
        build("patch27", SHAPE, patches=(27,))


def test_wrong_input_shape_raises():
    model = build("cnn3d", SHAPE)
    with pytest.raises(InputError, match="expects input"):
        model(torch.zeros(2, 1, 19, 23, 20))


def test_cnn3d_overfits_a_tiny_batch():
    x = volume(1, shape=(12, 13, 11), batch=8, seed=1)
    y = torch.tensor([0, 1] * 4)
    model = build("cnn3d", (12, 13, 11), widths=(8, 8, 8), kernels=(3, 3, 3), hidden=16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_a_residual_network_pickled_before_the_sum_was_a_module_still_runs():
    """Registered models are pickled modules; those saved before `Add` existed have no `add` child."""
    import pickle

    torch.manual_seed(0)
    net = build("inception_resnet3d", (12, 12, 12), 1, 2, width=4, modules=1, hidden=8).eval()
    x = torch.randn(2, 1, 12, 12, 12)
    expected = net(x)
    for module in net.modules():
        if "add" in module._modules:
            del module._modules["add"]          # what an old pickle's state holds
    restored = pickle.loads(pickle.dumps(net))
    assert torch.allclose(restored(x), expected)


def test_parcel_bottleneck_ties_each_dimension_to_its_own_part_of_the_brain():
    """`bottleneck: parcels`: the config round-trips through JSON, every module runs once, and a dimension
    paints (and reads) its parcel: at the start, its decoder change lies within 3 SD of its centre."""
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[3:16, 4:19, 3:18] = True
    centres = parcel_centres_in(mask, 12)
    assert all(mask[tuple(round(c) for c in p)] for p in centres)  # k-means of the brain's voxels
    model = build("autoencoder3d", SHAPE, in_channels=2, latent=12, widths=(4, 4), bottleneck="parcels",
                  parcel_centres=centres, parcel_width=1.5).eval()
    x = volume(2)
    again = build("autoencoder3d", **json.loads(json.dumps(model.config)))
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x)) and model.encode(x).shape == (2, 12)
    calls = {id(m): 0 for m in leaves(model)}
    hooks = [m.register_forward_hook(lambda mod, i, o: calls.__setitem__(id(mod), calls[id(mod)] + 1)) for m in leaves(model)]
    model(x)
    for h in hooks:
        h.remove()
    assert set(calls.values()) == {1}
    grid = torch.stack(torch.meshgrid(*[torch.arange(n) for n in SHAPE], indexing="ij"), -1).float()
    with torch.no_grad():
        for d in (0, 5, 11):
            one = torch.zeros(1, 12)
            one[0, d] = 1.0
            painted = (model.expand(one) - model.expand(torch.zeros(1, 12))).abs().sum(1)[0]
            near = ((grid - torch.tensor(centres[d])) ** 2).sum(-1) <= (3 * 1.5) ** 2
            assert painted[near].sum() > 0.95 * painted.sum()  # a 3D Gaussian holds 97% of its mass within 3 SD
            read = torch.softmax(model.encoder[-1].speed * model.encoder[-1].logits[d], 0).reshape(SHAPE)
            assert read[near].sum() > 0.95  # and it reads a weighted mean of the same part
    with pytest.raises(InputError, match="bottleneck"):
        build("autoencoder3d", SHAPE, bottleneck="sparse")


def test_ward_parcels_group_the_voxels_that_vary_together_and_the_bottleneck_can_start_from_them():
    """Two halves of a brain whose voxels share a subject-level term each: Ward with k = 2 splits the brain
    exactly there (and nowhere outside the mask), and `start_as` makes each parcel read its own half."""
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[3:16, 4:19, 3:18] = True
    half = torch.zeros(SHAPE, dtype=torch.bool)
    half[3:10] = True
    a, b = torch.randn(60, 1, 1, 1, generator=g), torch.randn(60, 1, 1, 1, generator=g)
    maps = torch.where(half, a, b) + 0.3 * torch.randn(60, *SHAPE, generator=g)
    labels = ward_parcels(maps, mask, 2)
    assert (labels[~mask.flatten()] == -1).all()
    inside = labels[mask.flatten()]
    first = labels[(mask & half).flatten()]
    assert len(first.unique()) == 1 and len(inside.unique()) == 2 and (labels[(mask & ~half).flatten()] != first[0]).all()
    model = build("autoencoder3d", SHAPE, latent=2, widths=(4,), bottleneck="parcels")
    read = model.encoder[-1]
    read.start_as(labels)
    w = read.weights()
    for k in (0, 1):
        assert w[k][labels == k].sum() > 0.99
    with pytest.raises(InputError, match="parcel"):
        read.start_as(torch.zeros_like(labels))   # parcel 1 would have no voxel
