"""Genotypes of the phantom cohort, simulated with msprime's coalescent with recombination
(Baumdicker et al. 2022, Genetics 220:iyab229), and written as PLINK 1 .bed/.bim/.fam with bed-reader.

Assumptions: a panmictic population of constant effective size (or two such populations split from a
common ancestor), neutral evolution, human-like rates. Sites with more than two alleles are dropped;
`allele_1` (the .bim's fifth column, the allele PLINK counts by default) is the derived allele.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msprime
import numpy as np
import pandas as pd
from bed_reader import to_bed


@dataclass
class Genotypes:
    dosage: np.ndarray        # (variants, individuals) int8 count of allele_1, the truth (no missing)
    variants: pd.DataFrame    # chrom, pos, id, allele_1, allele_2, freq (of allele_1)
    population: np.ndarray    # (individuals,) 0 or 1


def simulate(
    n_individuals: int,
    *,
    seed: int,
    chromosomes: int,
    chromosome_length_mb: float,
    effective_size: float,
    recombination_rate: float,
    mutation_rate: float,
    min_maf: float,
    second_population_fraction: float = 0.0,
    split_generations: float = 1000.0,
) -> Genotypes:
    """Simulate diploid genotypes, one independent ancestry per chromosome, keeping biallelic sites
    with minor allele frequency >= `min_maf`. With `second_population_fraction` > 0 the individuals
    come from two populations that split `split_generations` ago (Fst about 1 - exp(-t / 2Ne))."""
    rng = np.random.default_rng(seed)
    n_second = int(round(n_individuals * second_population_fraction))
    demography = msprime.Demography()
    if n_second:
        demography.add_population(name="A", initial_size=effective_size)
        demography.add_population(name="B", initial_size=effective_size)
        demography.add_population(name="ANC", initial_size=effective_size)
        demography.add_population_split(time=split_generations, derived=["A", "B"], ancestral="ANC")
        samples = [msprime.SampleSet(n_individuals - n_second, population="A"), msprime.SampleSet(n_second, population="B")]
    else:
        demography.add_population(name="A", initial_size=effective_size)
        samples = [msprime.SampleSet(n_individuals, population="A")]
    population = np.r_[np.zeros(n_individuals - n_second, int), np.ones(n_second, int)]

    dosages, tables = [], []
    for chrom in range(1, chromosomes + 1):
        ts = msprime.sim_ancestry(
            samples, demography=demography, sequence_length=chromosome_length_mb * 1e6,
            recombination_rate=recombination_rate, random_seed=int(rng.integers(1, 2**31)),
        )
        ts = msprime.sim_mutations(ts, rate=mutation_rate, random_seed=int(rng.integers(1, 2**31)))
        haplotypes = ts.genotype_matrix()  # (sites, 2 * individuals), allele indices
        biallelic = haplotypes.max(1) == 1
        sites = [s for s, keep in zip(ts.sites(), biallelic) if keep]
        haplotypes = haplotypes[biallelic]
        dosage = (haplotypes[:, 0::2] + haplotypes[:, 1::2]).astype(np.int8)
        freq = dosage.mean(1) / 2
        common = np.minimum(freq, 1 - freq) >= min_maf
        pos = np.array([int(s.position) for s in sites])[common]
        keep_pos = np.r_[True, np.diff(pos) > 0]  # at most one variant per base pair
        dosage, freq, pos = dosage[common][keep_pos], freq[common][keep_pos], pos[keep_pos]
        kept = [s for s, c in zip(sites, common) if c]
        kept = [s for s, k in zip(kept, keep_pos) if k]
        tables.append(pd.DataFrame({
            "chrom": str(chrom), "pos": pos + 1,  # msprime positions are 0-based
            "id": [f"{chrom}:{p + 1}" for p in pos],
            "allele_1": [s.mutations[0].derived_state for s in kept],
            "allele_2": [s.ancestral_state for s in kept],
            "freq": freq,
        }))
        dosages.append(dosage)
    return Genotypes(np.vstack(dosages), pd.concat(tables, ignore_index=True), population)


def write_plink(prefix: Path, genotypes: Genotypes, iids: list[str], sexes: np.ndarray, columns: np.ndarray, missing_rate: float, rng: np.random.Generator) -> int:
    """Write the individuals at `columns` of the dosage matrix as PLINK 1 files at `prefix`, with a
    fraction `missing_rate` of calls set missing at random. Returns the number of missing calls."""
    val = genotypes.dosage[:, columns].T.astype(np.float32)
    missing = rng.random(val.shape) < missing_rate
    val[missing] = np.nan
    v = genotypes.variants
    prefix.parent.mkdir(parents=True, exist_ok=True)
    to_bed(
        str(prefix) + ".bed", val,
        properties={
            "fid": iids, "iid": iids, "sex": sexes,
            "sid": v["id"].to_numpy(), "chromosome": v["chrom"].to_numpy(), "bp_position": v["pos"].to_numpy(),
            "allele_1": v["allele_1"].to_numpy(), "allele_2": v["allele_2"].to_numpy(),
        },
        count_A1=True,
    )
    return int(missing.sum())


def pick_causal(genotypes: Genotypes, n: int, min_maf: float, rng: np.random.Generator, margin_bp: int = 250_000) -> pd.DataFrame:
    """Choose `n` common variants (MAF >= `min_maf`) on different chromosomes, away from the ends."""
    v = genotypes.variants
    maf = np.minimum(v["freq"], 1 - v["freq"])
    chroms = rng.permutation(v["chrom"].unique())
    if n > len(chroms):
        raise ValueError(f"{n} causal variants need {n} chromosomes; the phantom has {len(chroms)}")
    rows = []
    for chrom in chroms[:n]:
        on = v["chrom"] == chrom
        length = v.loc[on, "pos"].max()
        ok = np.flatnonzero(on & (maf >= min_maf) & (v["pos"] > margin_bp) & (v["pos"] < length - margin_bp))
        rows.append(int(rng.choice(ok)))
    return v.iloc[rows].assign(index=rows).reset_index(drop=True)
