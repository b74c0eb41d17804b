"""Would a batched torch demons make the log-Jacobian maps faster than SimpleITK's on a CPU?

    python benchmarks/demons_torch.py [--store stores/volumes.zarr] [--subjects 4] [--threads 2]

The same algorithm as `volumes.morphometry.log_jacobian` (ITK's FastSymmetricForcesDemons: additive
update 2·s·g / (|g|² + s²/N), g the sum of the fixed and warped moving gradients, s the intensity
difference, each step at most half a voxel; the displacement field smoothed by a Gaussian after every
iteration; the default 4 then 2 mm levels and 30 + 10 iterations), written in torch and run on all
subjects at once. Prints the time per subject of both, one torch iteration's parts, and how closely the
torch maps follow ITK's inside the brain. Not the pipeline's code: a measured alternative
(BENCHMARKS.md, "Morphometry").
"""

import argparse
import math
import time

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
import zarr

from _common import machine
from endopheno.volumes.morphometry import MorphometryParams, log_jacobian
from endopheno.volumes.preprocess import zscore_inside


def gaussian(sd: float) -> torch.Tensor:
    r = max(1, math.ceil(3 * sd))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sd) ** 2)
    return k / k.sum()


def smooth(field: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian of each component, edges replicated (ITK's zero-flux Neumann)."""
    b, c, *shape = field.shape
    r, out = len(k) // 2, field.reshape(b * c, 1, *shape)
    for axis in range(3):
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        view = [1, 1, 1, 1, 1]
        view[2 + axis] = -1
        out = F.conv3d(F.pad(out, pad, mode="replicate"), k.view(view))
    return out.view(b, c, *shape)


def gradient(img: torch.Tensor, mm: float) -> torch.Tensor:
    g = torch.zeros(img.shape[0], 3, *img.shape[2:])
    g[:, 0, 1:-1] = (img[:, 0, 2:] - img[:, 0, :-2]) / (2 * mm)
    g[:, 1, :, 1:-1] = (img[:, 0, :, 2:] - img[:, 0, :, :-2]) / (2 * mm)
    g[:, 2, :, :, 1:-1] = (img[:, 0, :, :, 2:] - img[:, 0, :, :, :-2]) / (2 * mm)
    return g


def sample(img: torch.Tensor, voxels: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """`img` at voxel coordinates ``[B, 3, ...]`` (trilinear); grid_sample wants (z, y, x) in [-1, 1]."""
    size = torch.tensor(img.shape[2:], dtype=torch.float32).view(1, 3, 1, 1, 1)
    grid = (2 * voxels / (size - 1) - 1).permute(0, 2, 3, 4, 1).flip(-1)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode=padding, align_corners=True)


def demons(fixed, moving, field, iterations: int, mm: float, sd: float, max_step: float = 0.5):
    base = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in fixed.shape[2:]], indexing="ij"))
    field = torch.zeros(len(fixed), 3, *fixed.shape[2:]) if field is None else field
    k, g_fixed, normaliser = gaussian(sd), gradient(fixed, mm), (max_step * mm) ** 2
    for _ in range(iterations):
        warped = sample(moving, base + field / mm)
        g = g_fixed + gradient(warped, mm)
        s = fixed - warped
        denominator = (g * g).sum(1, keepdim=True) + s * s / normaliser
        step = torch.where((s.abs() >= 1e-3) & (denominator >= 1e-9), 2 * s / denominator.clamp_min(1e-9), 0.0)
        field = smooth(field + step * g, k)
    return field


def onto(field: torch.Tensor, factor: int, shape) -> torch.Tensor:
    """A field of a BinShrink-ed grid (coarse voxel i at fine i·f + (f-1)/2) on the finer grid."""
    axes = [(torch.arange(n, dtype=torch.float32) - (factor - 1) / 2) / factor for n in shape]
    voxels = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None].expand(len(field), -1, -1, -1, -1)
    return sample(field, voxels, padding="border")


def log_jacobians(fixed, moving, mask, store_mm: float, p: MorphometryParams) -> torch.Tensor:
    field, previous = None, None
    for mm, iterations in zip(p.levels_mm, p.iterations):
        f = int(round(mm / store_mm))
        shrunk_fixed, shrunk_moving = (F.avg_pool3d(fixed, f), F.avg_pool3d(moving, f)) if f > 1 else (fixed, moving)
        if field is not None and previous != f:
            field = onto(field, previous // f, shrunk_fixed.shape[2:])
        field, previous = demons(shrunk_fixed, shrunk_moving, field, iterations, mm, p.smoothing_voxels), f
    if previous != 1:
        field = onto(field, previous, fixed.shape[2:])
    u = F.pad(field, (1, 1, 1, 1, 1, 1), mode="replicate")
    d = [(u[:, :, 2:, 1:-1, 1:-1] - u[:, :, :-2, 1:-1, 1:-1]), (u[:, :, 1:-1, 2:, 1:-1] - u[:, :, 1:-1, :-2, 1:-1]),
         (u[:, :, 1:-1, 1:-1, 2:] - u[:, :, 1:-1, 1:-1, :-2])]
    m = [[d[j][:, i] / (2 * store_mm) + (i == j) for j in range(3)] for i in range(3)]
    det = (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
           + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))
    return torch.where(mask, torch.log(det.clamp_min(1e-3)), 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="stores/volumes.zarr")
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    print(f"machine: {machine()}")
    g = zarr.open_group(a.store, path="mni", mode="r")
    template, mask = np.asarray(g["template"][:], np.float32), np.asarray(g["brain_mask"][:], bool)
    store_mm, p = float(abs(np.asarray(g.attrs["affine"])[0][0])), MorphometryParams()
    volumes = [np.asarray(g["T1w"][r], np.float32) for r in range(a.subjects)]

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)   # as the pipeline: one ITK thread per subject and core
    t0 = time.perf_counter()
    itk = [log_jacobian(v, template, mask, store_mm, p) for v in volumes]
    itk_s = (time.perf_counter() - t0) / a.subjects

    torch.set_num_threads(a.threads)
    fixed = torch.from_numpy(zscore_inside(template, mask))[None, None].expand(a.subjects, -1, -1, -1, -1).contiguous()
    moving = torch.from_numpy(np.stack([zscore_inside(v, mask) for v in volumes]))[:, None]
    with torch.inference_mode():
        t0 = time.perf_counter()
        maps = log_jacobians(fixed, moving, torch.from_numpy(mask), store_mm, p).numpy()
        torch_s = (time.perf_counter() - t0) / a.subjects
        field, k = torch.randn(a.subjects, 3, *mask.shape), gaussian(p.smoothing_voxels)
        base = torch.zeros_like(field)
        parts = {}
        for name, fn in (("one 2 mm iteration", lambda: demons(fixed, moving, None, 1, store_mm, p.smoothing_voxels)),
                         ("  field smoothing", lambda: smooth(field, k)), ("  warp", lambda: sample(moving, base + field))):
            fn()
            t0 = time.perf_counter()
            fn()
            parts[name] = (time.perf_counter() - t0) / a.subjects
    print(f"{a.subjects} subjects, grid {mask.shape}, levels {list(p.levels_mm)} mm, iterations {list(p.iterations)}")
    print(f"SimpleITK, 1 thread: {itk_s:.2f} s per subject (per core)")
    print(f"torch, all subjects at once, {a.threads} thread(s): {torch_s:.2f} s per subject "
          f"({torch_s * a.threads:.2f} core-s, {torch_s * a.threads / itk_s:.2f}x ITK's)")
    for name, s in parts.items():
        print(f"  {name}: {1000 * s:.0f} ms per subject")
    for r in range(a.subjects):
        x, y = maps[r][mask], itk[r][mask]
        print(f"subject {r}: correlation with ITK's map {np.corrcoef(x, y)[0, 1]:.3f}, SD {x.std():.3f} vs {y.std():.3f}")


if __name__ == "__main__":
    main()
