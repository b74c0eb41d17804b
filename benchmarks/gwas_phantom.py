"""Validation of the genotype store and the GWAS on the phantom's truth: are the planted loci found?

    python benchmarks/gwas_phantom.py [--phantom data/phantom] [--genotypes stores/genotypes/phantom]

Phenotypes are the true region volumes (log) of `ground_truth/subjects.tsv` — the ceiling an imaging
endophenotype can reach; the pipeline itself never reads them. Covariates: age, sex, diagnosis, site
(participants.tsv) and the genotype store's first `--pcs` PCs (10; 0 shows what population structure
does without them). A planted variant counts as found when a study-wide locus lead of its region's
phenotype lies within 500 kb of it; any other locus is a false one (`endopheno.validation`'s rules, per region).
Writes stores/gwas/truth_volumes/ and an MLflow run, and prints the table for BENCHMARKS.md.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from _common import machine

from endopheno.genotypes.sources import open_source
from endopheno.gwas.phenotypes import Aligned, align, read_table
from endopheno.gwas.run import GwasOptions, scan
from endopheno.gwas.study import StudySettings, analyse, track
from endopheno.validation import read_causal, score_loci

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--phantom", default="data/phantom")
    ap.add_argument("--genotypes", default="stores/genotypes/phantom")
    ap.add_argument("--out", default="stores/gwas/truth_volumes")
    ap.add_argument("--pcs", type=int, default=10)
    args = ap.parse_args()
    phantom, out = Path(args.phantom), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")

    truth = pd.read_csv(phantom / "ground_truth/subjects.tsv", sep="\t")
    volumes = [c for c in truth.columns if c.startswith("volume_")]
    pheno = truth[["subject_id"]].rename(columns={"subject_id": "IID"}).assign(
        **{c.removeprefix("volume_"): np.log(truth[c]) for c in volumes})
    pheno.to_csv(out / "pheno.tsv", sep="\t", index=False)
    participants = pd.read_csv(phantom / "bids/participants.tsv", sep="\t")
    covar = pd.DataFrame({"IID": participants["participant_id"].str.removeprefix("sub-"), "age": participants["age"],
                          "sex": participants["sex"], "diagnosis": participants["diagnosis"], "site": participants["site"]})
    covar.to_csv(out / "covar.tsv", sep="\t", index=False)

    source = open_source(store=args.genotypes)
    phenotypes = align(read_table(out / "pheno.tsv"), source.samples)
    covariates = align(read_table(out / "covar.tsv", kind="covariate"), source.samples)
    pcs = [f"pc{i}" for i in range(1, args.pcs + 1)]
    covariates = Aligned(np.hstack([covariates.values, source.samples[pcs].to_numpy(float)]), covariates.names + pcs)
    t = time.perf_counter()
    summary = scan(source, phenotypes, covariates, out, GwasOptions(workers=2))
    settings = StudySettings()
    study = analyse(out, source, phenotypes, covariates, settings)
    run_id = track(out, study, {**summary.__dict__, "options": {}}, {"genotypes": args.genotypes,
                   "genotypes_digest": getattr(source, "digest", ""), "pheno": "ground_truth volumes (validation)",
                   "phenotypes": len(phenotypes.names), "covariates": ",".join(covariates.names)}, settings=settings)
    print(f"scan: {summary.tests} tests in {summary.seconds:.1f} s; analysis and MLflow run {run_id} "
          f"in {time.perf_counter() - t - summary.seconds:.1f} s")

    causal = read_causal(phantom / "ground_truth/causal_variants.tsv")
    loci = pd.read_parquet(out / "loci.parquet")
    loci = loci[loci["study_wide"]]
    lambdas = {row["phenotype"]: row["lambda_gc"] for row in study["phenotypes"]}
    print("\n| phenotype | planted variant | found (lead, distance, p) | false loci | λGC |")
    print("| --- | --- | --- | --- | --- |")
    found = false = 0
    for name in phenotypes.names:   # each region's own loci against its own planted variant
        table = score_loci(loci[loci["phenotype"] == name], causal[causal["region"] == name])
        planted, wrong = table[table["kind"] == "planted"], int((table["kind"] == "false").sum())
        cells = [f"yes ({v.lead_id}, {v.distance_kb:.0f} kb, {v.p:.1e})" if v.found else "**no**"
                 for v in planted.itertuples()]
        found, false = found + int(planted["found"].sum()), false + wrong
        print(f"| {name} | {', '.join(planted['planted_variant']) or '—'} | {', '.join(cells) or '—'} | {wrong} | "
              f"{lambdas[name]:.3f} |")
    print(f"\nplanted loci found: {found} of {len(causal)}; false loci: {false}; "
          f"study-wide threshold {study['thresholds']['study-wide']:.1e}")
