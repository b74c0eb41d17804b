"""Input gradients (what integrated gradients computes at each path point) of the registered `cnn3d`
champion with its weights in PyTorch's default layout and in channels-last 3D (what `attribute` uses).

    python benchmarks/bench_attribution_layout.py [--model endopheno.cnn3d@champion] [--repeats 3]

400 random volumes of the model's grid in batches of 50 (IG's default path points per subject); the
layouts alternate, median of `--repeats` each; the largest difference between the two gradients.
"""

import argparse
import statistics
import time

import torch

from _common import machine

from endopheno.models.architectures import layout_of
from endopheno.params import load_params


def gradients(model, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    x = x.clone().requires_grad_()
    t0 = time.perf_counter()
    for i in range(0, len(x), 50):
        model(x[i:i + 50])[:, -1].sum().backward()
    return time.perf_counter() - t0, x.grad


if __name__ == "__main__":
    import mlflow

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="endopheno.cnn3d@champion")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    mlflow.set_tracking_uri(load_params("attribute")["tracking_uri"])
    model = mlflow.pytorch.load_model(f"models:/{a.model}").eval()
    x = torch.randn(400, len(model.inputs), *model.mask.shape)
    times = {torch.contiguous_format: [], layout_of(model.net): []}
    grads = {}
    for _ in range(a.repeats):
        for layout in times:
            model.net.to(memory_format=layout)
            seconds, grads[layout] = gradients(model, x)
            times[layout].append(seconds)
    (plain, t_plain), (fast, t_fast) = ((k, statistics.median(v)) for k, v in times.items())
    print(f"machine: {machine()}; {a.model}; torch threads {torch.get_num_threads()}")
    print(f"400 input gradients: default layout {t_plain:.2f} s, {fast} {t_fast:.2f} s: {t_plain / t_fast:.2f}x; "
          f"largest difference {float((grads[plain] - grads[fast]).abs().max()):.2e} "
          f"(largest gradient {float(grads[plain].abs().max()):.2e})")
