"""Where the time after a GWAS scan goes: each step of `gwas.study.analyse` on an existing scan output.

    python benchmarks/bench_gwas_post.py OUT [OUT ...] [--repeats 3]

OUT is a `gwas.out/<SET>` folder of a finished run (its results/ Parquet; e.g. stores/gwas/ae_t1 after
`dvc repro`). Times λGC, the hits query, the QQ plot and the combined Manhattan plot, each repeated and
the median printed, the figures written to a temporary folder (the run's own plots are not touched).
Clumping and the lead models need the genotype store and are left out.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import duckdb

from _common import machine
from endopheno.gwas import results


def timed(step, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t)
    return statistics.median(seconds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("outs", nargs="+", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    print(f"machine: {machine()}\n")
    print("| scan output | tests | λGC | hits | QQ plot | Manhattan (all) |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for out in a.outs:
            lambdas = results.lambda_gc(out)
            combined = duckdb.sql(f"""SELECT chrom::VARCHAR AS chrom, pos, max(log10_p) AS log10_p
                                      FROM {results.results_sql(out)} WHERE reason IS NULL GROUP BY ALL""").df()
            t = {"λGC": timed(lambda: results.lambda_gc(out), a.repeats),
                 "hits": timed(lambda: results.hits(out, 5e-8), a.repeats),
                 "qq": timed(lambda: results.qq(out, Path(tmp) / "qq.png", lambdas), a.repeats),
                 "manhattan": timed(lambda: results.manhattan(combined, Path(tmp) / "m.png", "all", {"gw": 5e-8}),
                                    a.repeats)}
            print(f"| {out} | {int(lambdas['tests'].sum()):,} | " + " | ".join(f"{v:.2f} s" for v in t.values()) + " |")


if __name__ == "__main__":
    main()
