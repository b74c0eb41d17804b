"""Simulated association studies with known truth, for tests, type-I error checks and benchmarks.

Genotypes are independent Binomial(2, f) hard calls (no LD) with allele frequencies drawn uniformly from
[min_maf, 0.5]; covariates are standard normal; phenotypes are the covariates' sum times 0.5, plus the
effects of the chosen causal variants, plus N(0, 1) noise. Written in PLINK 2's formats (.bed/.bim/.fam,
pheno and covar TSVs with NA for missing) so that plink2 can read the very same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def write_study(out: str | Path, *, samples: int, variants: int, phenotypes: int, covariates: int = 3,
                missing_genotypes: float = 0.0, missing_phenotypes: float = 0.0, min_maf: float = 0.01,
                causal: dict[int, float] | None = None, chromosomes: int = 2, seed: int = 0) -> Path:
    """Write ``out/study.{bed,bim,fam}``, ``out/pheno.tsv`` and ``out/covar.tsv``; return ``out/study``.

    `causal` maps a variant index to its effect (per allele, in phenotype SD units) on every phenotype
    ``y<j>`` with even j; the odd ones stay null.
    """
    from bed_reader import to_bed

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    freq = rng.uniform(min_maf, 0.5, variants)
    dosages = np.empty((samples, variants), dtype=np.int8)
    for start in range(0, variants, 4096):  # in blocks: the float draws of a whole study would not fit
        f = freq[start:start + 4096]
        dosages[:, start:start + len(f)] = (rng.random((samples, len(f))) < f) + (rng.random((samples, len(f))) < f)
    iid = np.array([f"s{i:06d}" for i in range(samples)])
    chrom = np.sort(rng.integers(1, chromosomes + 1, variants))
    pos = np.concatenate([np.sort(rng.choice(10**8, np.sum(chrom == c), replace=False)) + 1 for c in range(1, chromosomes + 1)])
    ids = np.array([f"{c}:{p}" for c, p in zip(chrom, pos)])
    cov = rng.normal(size=(samples, covariates))
    y = 0.5 * cov.sum(axis=1, keepdims=True) + rng.normal(size=(samples, phenotypes))
    for v, effect in (causal or {}).items():
        y[:, ::2] += effect * dosages[:, v:v + 1]
    y[rng.random(y.shape) < missing_phenotypes] = np.nan
    if missing_genotypes:
        missing = rng.random(dosages.shape) < missing_genotypes
        dosages[missing] = -127
        del missing
    to_bed(out / "study.bed", dosages, properties={
        "fid": iid, "iid": iid, "sex": rng.integers(1, 3, samples), "chromosome": chrom.astype(str), "sid": ids,
        "bp_position": pos, "allele_1": rng.choice(list("ACGT"), variants), "allele_2": np.full(variants, "N")},
        count_A1=True)
    ids_table = pd.DataFrame({"#FID": iid, "IID": iid})
    pd.concat([ids_table, pd.DataFrame(y, columns=[f"y{j}" for j in range(phenotypes)])], axis=1).to_csv(
        out / "pheno.tsv", sep="\t", index=False, na_rep="NA", float_format="%.10g")
    pd.concat([ids_table, pd.DataFrame(cov, columns=[f"c{j}" for j in range(covariates)])], axis=1).to_csv(
        out / "covar.tsv", sep="\t", index=False, na_rep="NA", float_format="%.10g")
    return out / "study"
