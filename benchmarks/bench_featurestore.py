"""Feature-store measurements (issue 4): writing a 10,000-subject × 128-feature version and reading it
back through DuckDB; latency of the cohort join for 10,000 subjects and of a point lookup, warm (same
connection) and cold (a fresh process: interpreter start excluded, connect + first query included);
catalog rebuild with 20 versions of 5 feature sets. Synthetic data in a temporary repository root:
real Delta tables, a real genotype store layout and a real catalog file.

    .venv/bin/python benchmarks/bench_featurestore.py [--subjects 10000] [--features 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from _common import du, machine
from endopheno.featurestore.catalog import CatalogParams, build_catalog, connect
from endopheno.featurestore.store import write_version
from endopheno.genotypes.store import create_dosages

PROV = {"git_revision": "bench", "mlflow_run_id": "", "model_name": "bench", "model_version": "1",
        "volume_store_digest": "", "params_hash": "", "schema_version": 1}


def feature_table(n: int, k: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    cols = {"subject_id": [f"s{i:06d}" for i in range(n)], "session": pa.nulls(n, pa.string())}
    cols.update({f"f{j:03d}": rng.standard_normal(n) for j in range(k)})
    cols.update(model_name=["bench"] * n, model_version=["1"] * n)
    return pa.table(cols)


def genotype_store(path: Path, n: int, variants: int = 100) -> None:
    path.mkdir(parents=True)
    ids = [f"s{i:06d}" for i in range(n)]
    rng = np.random.default_rng(1)
    pcs = {f"pc{j}": rng.standard_normal(n) for j in range(1, 11)}
    pd.DataFrame({"fid": ids, "iid": ids, "sex": 1, "call_rate": 1.0, **pcs}).to_parquet(path / "samples.parquet")
    pd.DataFrame({"chrom": "1", "pos": np.arange(variants), "id": [f"v{i}" for i in range(variants)], "allele1": "A",
                  "allele2": "G"}).to_parquet(path / "variants.parquet")
    pd.DataFrame({"fid": [], "iid": [], "sex": [], "call_rate": [], "reason": []}).to_parquet(path / "removed_samples.parquet")
    arr = create_dosages(path / "dosages.zarr", variants, n, np.dtype("int8"), 8192, {"digest": "bench"})
    arr[:] = rng.integers(0, 3, (variants, n), dtype=np.int8)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


COLD = textwrap.dedent("""
    import sys, time, duckdb
    t0 = time.perf_counter()
    con = duckdb.connect(sys.argv[1], read_only=True)
    con.execute("SET file_search_path = '" + sys.argv[2] + "'")
    con.execute(sys.argv[3]).fetchall()
    print(time.perf_counter() - t0)
""")


def cold(catalog: Path, root: Path, sql: str, repeats: int) -> float:
    return statistics.median(float(subprocess.run([sys.executable, "-c", COLD, str(catalog), str(root), sql],
                                                  capture_output=True, text=True, check=True).stdout)
                             for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=10_000)
    ap.add_argument("--features", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    out = {"machine": machine(), "subjects": a.subjects, "features": a.features}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        table = feature_table(a.subjects, a.features, 0)
        t0 = time.perf_counter()
        write_version(root / "stores/features/bench", table, {**PROV, "input_digest": "0"})
        out["write_s"] = time.perf_counter() - t0
        out["version_mib"] = du(root / "stores/features/bench") / 2**20
        ids = [f"s{i:06d}" for i in range(a.subjects)]
        pd.DataFrame({"participant_id": [f"sub-{s}" for s in ids], "age": 70.0, "sex": "F"}).to_csv(
            root / "participants.tsv", sep="\t", index=False)
        genotype_store(root / "stores/genotypes/bench", a.subjects)
        pd.DataFrame({"subject": ids, "qc_correlation": 0.9, "qc_pass": True, "note": ""}).to_csv(root / "qc.tsv", sep="\t", index=False)
        p = CatalogParams(definitions="features", participants="participants.tsv", imaging_qc="qc.tsv",
                          genotypes="stores/genotypes/bench", gwas=None, analysis_feature_set="bench")
        (root / "features").mkdir()
        out["catalog_1_set_s"] = build_catalog(p, root)["seconds"]
        catalog = root / p.path
        con = connect(catalog)
        t0 = time.perf_counter()
        back = con.sql("SELECT * FROM features.bench").to_arrow_table()
        out["read_back_s"] = time.perf_counter() - t0
        assert back.num_rows == a.subjects and back.num_columns == a.features + 4
        join = "SELECT * FROM cohort.analysis"
        point = "SELECT * FROM features.bench WHERE subject_id = 's005000'"
        assert len(con.execute(join).fetchall()) == a.subjects
        out["join_warm_s"] = timed(lambda: con.execute(join).fetchall(), a.repeats)
        out["point_warm_s"] = timed(lambda: con.execute(point).fetchall(), a.repeats)
        out["join_cold_s"] = cold(catalog, root, join, a.repeats)
        out["point_cold_s"] = cold(catalog, root, point, a.repeats)
        con.close()

        # 20 versions of 5 sets (1,000 subjects × 16 features each), then one rebuild.
        for s in range(5):
            for v in range(20):
                write_version(root / f"stores/features/set{s}", feature_table(1000, 16, v), {**PROV, "input_digest": str(v)})
        p20 = CatalogParams(definitions="features", participants=None, imaging_qc=None, genotypes=None, gwas=None,
                            analysis_feature_set=None)
        out["catalog_rebuild_6_sets_101_versions_s"] = statistics.median(build_catalog(p20, root)["seconds"] for _ in range(3))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
