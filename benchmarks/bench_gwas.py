"""GWAS throughput against plink2 --glm, side by side on the same files in one run.

    python benchmarks/bench_gwas.py [--samples 10000 --variants 50000 --phenotypes 128 --threads 2]

For a complete and a 1%-missing version of one simulated study (3 covariates, hard calls): plink2
``--glm hide-covar omit-ref --threads T`` (omit-ref: A1 = the .bim's fifth column, as ours), then
endopheno's scan in float64 and float32 with its defaults (blocks of 1024 variants, threads = cores + 1,
so both tools use every core), each in a fresh process (its peak RSS is that process's).
Both write every variant × phenotype result (plink2: text files; endopheno: Parquet). Reports tests/s,
the ratio to plink2, the share of each phase, the GEMM's GFLOP/s against a measured BLAS peak, and peak
memory at two numbers of variants. Each configuration runs --repeats times (plink2 on the missing-call study --plink-repeats-missing times:
it takes minutes); medians are reported.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import machine

SCAN = """
import json, resource, sys, time
from endopheno.genotypes.sources import BedSource
from endopheno.gwas.phenotypes import align, read_table
from endopheno.gwas.run import GwasOptions, scan
folder, out, precision, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
bed = BedSource(folder + "/study")
pheno = align(read_table(folder + "/pheno.tsv"), bed.samples)
covar = align(read_table(folder + "/covar.tsv", kind="covariate"), bed.samples)
t = time.perf_counter()
s = scan(bed, pheno, covar, out, GwasOptions(precision=precision, workers=workers or None))
seconds = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # before reading the results back
from endopheno.gwas.results import lambda_gc, results_sql
import duckdb
lam = lambda_gc(out)["lambda_gc"]
below = duckdb.sql(f"SELECT avg((p < 0.01)::INT), avg((p < 0.05)::INT) FROM {results_sql(out)}").fetchall()[0]
print(json.dumps({"seconds": seconds, "tests": s.tests, "phases": s.phase_seconds,
                  "rss_gib": rss, "lambda": [lam.min(), lam.median(), lam.max()], "below": below}))
"""

PEAK = """
import time, numpy as np
from threadpoolctl import threadpool_limits
a = np.random.default_rng(0).random((4096, 4096))
for threads in (1, None):
    with threadpool_limits(threads, user_api="blas"):
        a @ a
        t = time.perf_counter(); a @ a; print(2 * 4096**3 / (time.perf_counter() - t) / 1e9)
"""


def study(folder: Path, samples: int, variants: int, phenotypes: int, missing: float) -> Path:
    from endopheno.gwas.simulate import write_study

    if not (folder / "study.bed").exists():
        write_study(folder, samples=samples, variants=variants, phenotypes=phenotypes, covariates=3,
                    missing_genotypes=missing, seed=1)
    return folder


def plink2(folder: Path, threads: int) -> float:
    t = time.perf_counter()
    subprocess.run(["plink2", "--bfile", folder / "study", "--pheno", folder / "pheno.tsv", "--covar",
                    folder / "covar.tsv", "--glm", "hide-covar", "omit-ref", "--threads", str(threads),
                    "--out", folder / "plink"], check=True, capture_output=True)
    return time.perf_counter() - t


def ours(folder: Path, precision: str, workers: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCAN, str(folder), str(folder / f"ours_{precision}"), precision,
                           str(workers)], check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--variants", type=int, default=50000)
    ap.add_argument("--phenotypes", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plink-repeats-missing", type=int, default=1,
                    help="plink2 runs on the missing-call study (each takes minutes)")
    ap.add_argument("--data", default="/tmp/bench_gwas")
    args = ap.parse_args()
    n, m, p = args.samples, args.variants, args.phenotypes
    print(f"machine: {machine()}")
    print(f"study: {n} samples × {m} variants × {p} phenotypes, 3 covariates; {args.repeats} repeats, medians\n")
    single, multi = (float(x) for x in subprocess.run([sys.executable, "-c", PEAK], capture_output=True, text=True,
                                                      check=True).stdout.split())
    print(f"BLAS dgemm peak (4096²): {single:.1f} GFLOP/s on 1 thread, {multi:.1f} on all\n")

    rows = {}
    for missing in (0.0, 0.01):
        folder = study(Path(args.data) / f"n{n}_m{m}_p{p}_miss{missing}", n, m, p, missing)
        runs = {"plink2": [], "float64": [], "float32": []}
        plink_repeats = args.repeats if missing == 0 else min(args.repeats, args.plink_repeats_missing)
        for r in range(args.repeats):  # interleaved, so that drift of the machine hits every tool alike
            if r < plink_repeats:
                runs["plink2"].append(plink2(folder, args.threads))
            for precision in ("float64", "float32"):
                runs[precision].append(ours(folder, precision, 0))
        t_plink = statistics.median(runs["plink2"])
        rows[missing] = {"plink2": t_plink}
        print(f"== {missing:.0%} missing genotype calls ==")
        print(f"plink2 --glm:  {t_plink:7.2f} s  {m * p / t_plink:12,.0f} tests/s")
        for precision in ("float64", "float32"):
            best = sorted(runs[precision], key=lambda r: r["seconds"])[len(runs[precision]) // 2]
            rows[missing][precision] = best["seconds"]
            print(f"endopheno {precision}: {best['seconds']:6.2f} s  {best['tests'] / best['seconds']:12,.0f} tests/s"
                  f"  {t_plink / best['seconds']:.2f}× plink2   peak RSS {best['rss_gib']:.2f} GiB")
            print(f"    null phenotypes: λGC median {best['lambda'][1]:.3f} (range {best['lambda'][0]:.3f}–"
                  f"{best['lambda'][2]:.3f}); p < 0.01: {best['below'][0]:.4f}, p < 0.05: {best['below'][1]:.4f}")
            total = sum(best["phases"].values())
            print("    phases (thread-seconds): " + ", ".join(f"{k} {v:.2f} s ({v / total:.0%})" for k, v in best["phases"].items()))
            if precision == "float64":
                gflop = 2 * n * m * (p + 4) / 1e9  # the product covers the P phenotypes and the 4 columns of Q
                print(f"    GEMM: {gflop / best['phases']['product']:.1f} GFLOP/s per thread "
                      f"({gflop / best['phases']['product'] / single:.0%} of the 1-thread peak)")
        print()
    print(f"slowdown from 1% missing calls: plink2 {rows[0.01]['plink2'] / rows[0.0]['plink2']:.2f}×, "
          f"endopheno float64 {rows[0.01]['float64'] / rows[0.0]['float64']:.2f}×, "
          f"float32 {rows[0.01]['float32'] / rows[0.0]['float32']:.2f}×")

    # Memory is bounded by the block, not by M: the same scan at half the variants.
    half = study(Path(args.data) / f"n{n}_m{m // 2}_p{p}_miss0.0", n, m // 2, p, 0.0)
    small = ours(half, "float64", 0)
    print(f"peak RSS, float64, complete: {small['rss_gib']:.2f} GiB at M = {m // 2}, "
          f"see above for M = {m} (blocks of 1024 variants, one thread per core + 1)")
