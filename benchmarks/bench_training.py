"""Training throughput of every model of params.yaml vs the data loader alone, on the phantom store.

    python benchmarks/bench_training.py [--volumes 96] [--device auto] [--workers 1]

The loader is not the bottleneck when it delivers volumes faster than the model consumes them. Loader:
one pass over `--volumes` subjects (Zarr read, pooling to train.resolution_mm, normalisation, the
model's augmentation) with 0, 1 and 2 worker processes. Training: forward + backward + Adam step over
the same subjects from tensors already in memory (so it excludes loading), after a
warm-up batch, in the channels-last 3D layout the trainer uses and in PyTorch's default contiguous
layout, their passes interleaved, median of 5 each. Prints the Markdown table for BENCHMARKS.md.
"""

import argparse
import statistics
import time

import numpy as np
import torch

from _common import machine

from endopheno.models.data import VolumeDataset, augmentation, brain_mask, pool_factor
from endopheno.models.train import device_of, load_train_params, model_spec, task_loss
from endopheno.models.architectures import build, layout_of
from endopheno.params import load_params
from endopheno.volumes.preprocess import open_mni


def loader_rate(dataset, batch_size: int, workers: int) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         prefetch_factor=2 if workers else None)
    t0, n = time.perf_counter(), 0
    for x, _ in loader:
        n += len(x)
    return n / (time.perf_counter() - t0)


def training_rates(spec, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, device: torch.device,
                   layouts, passes: int = 5) -> list[float]:
    """Volumes/s of forward + backward + AdamW step per memory layout: the layouts' passes interleaved
    (this machine's speed drifts by 2x within minutes), the median of `passes` each."""
    n_outputs = {"classification": 2, "regression": 1, "reconstruction": None}[spec.task]
    mask = mask.to(device)
    steps = []
    for layout in layouts:
        torch.manual_seed(0)
        net = build(spec.architecture, tuple(x.shape[2:]), x.shape[1], n_outputs, **spec.options)
        layout = layout if layout_of(net) == layout else torch.contiguous_format   # slice2d: 2D convolutions
        net.to(device, memory_format=layout)
        steps.append((net, torch.optim.AdamW(net.parameters(), lr=1e-3), layout))

    def one_pass(net, opt, layout, limit=None):
        for i in range(0, len(x) if limit is None else limit, spec.batch_size):
            xb, yb = x[i:i + spec.batch_size].to(device, memory_format=layout), y[i:i + spec.batch_size].to(device)
            opt.zero_grad()
            task_loss(spec.task, net(xb), xb, yb, mask).backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for step in steps:
        one_pass(*step, limit=spec.batch_size)   # warm-up
    times = [[] for _ in steps]
    for _ in range(passes):
        for step, t in zip(steps, times):
            t0 = time.perf_counter()
            one_pass(*step)
            t.append(time.perf_counter() - t0)
    return [len(x) / statistics.median(t) for t in times]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--volumes", type=int, default=96)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--models", nargs="*")
    a = ap.parse_args()
    p = load_train_params(load_params("train"))
    ds = open_mni(p.store)
    factor = pool_factor(float(abs(np.asarray(ds.attrs["affine"])[0, 0])), p.resolution_mm)
    mask = brain_mask(ds, factor)
    rows = np.flatnonzero(np.array(ds.source_sha256.values.tolist(), dtype=str) != "")[: a.volumes]
    device = device_of(a.device)
    print(f"machine: {machine()}; device {device}; {len(rows)} volumes at {p.resolution_mm} mm; torch threads {torch.get_num_threads()}\n")
    print("| model | inputs | loader 0 workers | loader 1 worker | loader 2 workers | training, channels-last (in memory) "
          "| training, contiguous | channels-last ÷ contiguous | loader 1 worker / training |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in a.models or list(p.models):
        spec = model_spec(p, name)
        base = VolumeDataset(p.store, rows, np.zeros(len(rows)), inputs=spec.inputs, factor=factor, mask=mask)
        mean = torch.zeros(len(spec.inputs)), torch.ones(len(spec.inputs))
        ds_aug = VolumeDataset(p.store, rows, np.zeros(len(rows)), inputs=spec.inputs, factor=factor, mask=mask,
                               normalise=mean, augment=augmentation(spec.augment, 0))
        loaders = [loader_rate(ds_aug, spec.batch_size, w) for w in (0, 1, 2)]
        x = torch.stack([base.volume(i) for i in range(len(rows))])
        y = torch.as_tensor((np.arange(len(rows)) % 2).astype(np.float32))
        train, plain = training_rates(spec, x, y, mask, device, (torch.channels_last_3d, torch.contiguous_format))
        print(f"| `{name}` ({spec.architecture}) | {'+'.join(spec.inputs)} | {loaders[0]:.1f} | {loaders[1]:.1f} | "
              f"{loaders[2]:.1f} | {train:.1f} | {plain:.1f} | {train / plain:.2f}× | {loaders[1] / train:.1f}× |", flush=True)
