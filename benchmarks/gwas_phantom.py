"""Validation of the genotype store and the GWAS on the phantom's truth: are the planted loci found?

    python benchmarks/gwas_phantom.py [--phantom data/phantom] [--genotypes stores/genotypes/phantom]

Phenotypes are the true region volumes (log) of `ground_truth/subjects.tsv` — the ceiling an imaging
endophenotype can reach; the pipeline itself never reads them. Covariates: age, sex, diagnosis, site
(participants.tsv) and the genotype store's first 10 PCs. A planted variant counts as found when a
locus lead of its region's phenotype lies within 500 kb of it; any other locus is a false one.
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

    causal = pd.read_csv(phantom / "ground_truth/causal_variants.tsv", sep="\t")
    loci = pd.read_parquet(out / "loci.parquet")
    lambdas = {row["phenotype"]: row["lambda_gc"] for row in study["phenotypes"]}
    print("\n| phenotype | planted variant | found (lead, distance, p) | false loci | λGC |")
    print("| --- | --- | --- | --- | --- |")
    found = false = 0
    for name in phenotypes.names:
        planted = causal[causal["region"] == name]
        mine = loci[loci["phenotype"] == name]
        hit = pd.Series(False, index=mine.index)
        cells = []
        for v in planted.itertuples():
            near = mine[(mine["chrom"] == str(v.chrom)) & ((mine["lead_pos"] - v.pos).abs() <= 500_000)]
            hit |= mine.index.isin(near.index)
            if len(near):
                lead = near.sort_values("p").iloc[0]
                cells.append(f"yes ({lead.lead_id}, {abs(lead.lead_pos - v.pos) / 1000:.0f} kb, {lead.p:.1e})")
                found += 1
            else:
                cells.append("**no**")
        false += int((~hit).sum())
        print(f"| {name} | {', '.join(planted['id']) or '—'} | {', '.join(cells) or '—'} | {int((~hit).sum())} | "
              f"{lambdas[name]:.3f} |")
    print(f"\nplanted loci found: {found} of {len(causal)}; false loci: {false}; "
          f"study-wide threshold {study['thresholds']['study-wide']:.1e}")
