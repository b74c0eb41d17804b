"""Time to generate the default phantom cohort (params.yaml `phantom`) on this machine.

    python benchmarks/bench_phantom.py [--subjects 400] [--out /tmp/phantom_bench]
"""

import argparse
import shutil
import time

from _common import du, machine

from endopheno.params import load_params
from endopheno.phantom import generate

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=None)
    ap.add_argument("--out", default="/tmp/phantom_bench")
    args = ap.parse_args()
    p = load_params("phantom")
    t = time.perf_counter()
    summary = generate(args.out, p, subjects=args.subjects, workers=p["workers"] or None)
    seconds = time.perf_counter() - t
    print(f"machine: {machine()}")
    print(f"phantom: {summary['subjects']} subjects, {summary['variants']} variants in {seconds:.1f} s "
          f"({du(args.out) / 2**20:.0f} MiB on disk)")
    shutil.rmtree(args.out)
