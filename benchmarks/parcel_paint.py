"""Training step of the `parcels` autoencoder: its paint as one matmul (the code) vs torch.einsum's order.

    python benchmarks/parcel_paint.py [--widths 16,16 --widths 8,8] [--batch 8] [--repeats 5]

`ParcelPaint` computes codes x colours, then one [B, C, K] @ [K, voxels] product. The same sum written as
``torch.einsum("bk,kv,kc->bcv", ...)`` contracts left to right (torch picks no order without opt_einsum)
and builds a [B, K, voxels] product first. Per setting: forward + backward + Adam step on random maps of
the models' 6 mm grid (26 x 32 x 27), the two forms interleaved, median of `--repeats`, one torch thread
per core as training uses. Prints the Markdown table for BENCHMARKS.md.
"""

import argparse
import statistics
import time

import torch

from _common import machine

from endopheno.models.architectures import Autoencoder3d, ParcelPaint

SHAPE = (26, 32, 27)


def einsum_paint(self: ParcelPaint, z: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bk,kv,kc->bcv", z, self.weights(), self.colour).reshape(len(z), -1, *self.shape)


def step_seconds(net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    t = time.perf_counter()
    loss = ((net(x) - x) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", action="append", help="encoder widths, comma-separated (repeatable)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, *SHAPE)
    print(f"machine: {machine()}; batch {args.batch}, grid {SHAPE}, median of {args.repeats}\n")
    print("| widths | paint: one matmul (s per step) | paint: einsum (s per step) | einsum ÷ matmul |")
    print("| --- | --- | --- | --- |")
    for widths in args.widths or ["16,16", "8,8"]:
        net = Autoencoder3d(SHAPE, widths=[int(w) for w in widths.split(",")], bottleneck="parcels")
        opt = torch.optim.Adam(net.parameters())
        forms = {"matmul": ParcelPaint.forward, "einsum": einsum_paint}
        times = {name: [] for name in forms}
        for i in range(args.repeats + 1):
            for name, forward in forms.items():
                ParcelPaint.forward = forward
                seconds = step_seconds(net, opt, x)
                if i:  # the first pass of each warms up
                    times[name].append(seconds)
        ParcelPaint.forward = forms["matmul"]
        m, e = (statistics.median(times[k]) for k in ("matmul", "einsum"))
        print(f"| [{widths.replace(',', ', ')}] | {m:.2f} | {e:.2f} | {e / m:.2f} |")


if __name__ == "__main__":
    main()
