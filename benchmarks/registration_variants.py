"""Registration settings side by side: time and accuracy against the phantom's true affine.

For each variant (a `;`-separated list of `key=value` overrides of `preprocess`'s params), registers the
same subjects in one process, one ITK thread, the variants alternating per subject so that a noisy machine
slows them alike; prints per variant the median seconds of the registration (N4 and resampling excluded),
and the mean displacement over the template brain between the recovered template->scanner affine and the
true one (median, 95th percentile, max, share below one 2 mm output voxel), and the QC correlation.

Reads the phantom's BIDS folder and truth (a `dvc repro`'s phantom stage):

    python benchmarks/registration_variants.py --subjects 40 --variant "" --variant "registration_iterations=50"
"""

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

from _common import machine
from endopheno.params import load_params
from endopheno.volumes.preprocess import PreprocessParams, preprocess_image, target_grid
from endopheno.volumes.qc import mean_displacement


def variant(base: dict, spec: str) -> PreprocessParams:
    overrides = {}
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        key, _, value = item.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    return PreprocessParams.from_dict({**base, **overrides})


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", action="append", default=[], help="key=value;key=value (repeatable; '' = params.yaml)")
    ap.add_argument("--subjects", type=int, default=40)
    ap.add_argument("--first", type=int, default=0, help="skip this many subjects (run disjoint sets in parallel)")
    ap.add_argument("--bids", default="data/phantom/bids")
    ap.add_argument("--truth", default="data/phantom/ground_truth")
    args = ap.parse_args()
    base = load_params("preprocess", Path("params.yaml"))
    variants = {spec: variant(base, spec) for spec in (args.variant or [""])}
    truth = json.loads((Path(args.truth) / "acquisition.json").read_text())
    _, affine, _, mask = target_grid(2.0, None)
    files = sorted(Path(args.bids).glob("sub-*/anat/*_T1w.nii.gz"))[args.first: args.first + args.subjects]
    print(machine())
    results = {spec: [] for spec in variants}
    for n, path in enumerate(files):
        img = nib.load(path)
        subject = path.name.split("_")[0].removeprefix("sub-")
        true = np.asarray(truth[subject]["template_to_scanner"])
        for spec, p in variants.items():
            out = preprocess_image(img, p)
            seconds = sum(v for k, v in out.seconds.items() if k.startswith("register"))
            error = mean_displacement(out.template_to_native, true, mask, affine)
            results[spec].append((seconds, error, out.qc_correlation, out.attempt))
        print(f"{n + 1}/{len(files)} {subject}: " + ", ".join(f"{r[-1][0]:.2f} s {r[-1][1]:.2f} mm" for r in results.values()), flush=True)
    print(f"\n{len(files)} subjects | variant | registration s (median, total) | error mm: median / 95th / max | < 2 mm | "
          f"min QC r | fallbacks")
    for spec, rows in results.items():
        s, e, r, a = map(np.asarray, zip(*rows))
        print(f"| `{spec or 'params.yaml'}` | {np.median(s):.2f}, {s.sum():.1f} | {np.median(e):.2f} / {np.percentile(e, 95):.2f} / "
              f"{e.max():.2f} | {100 * np.mean(e < 2):.0f}% | {r.min():.3f} | {int((a > 0).sum())} |")
