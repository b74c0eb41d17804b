"""Genotype quality control as PLINK 2 does it: sample call rate (``--mind``) first, then, on the kept
samples, variant call rate (``--geno``), Hardy-Weinberg equilibrium (``--hwe``) and minor allele
frequency and count (``--maf``, ``--mac``), in that order. A variant failing several filters is
counted against the first. Everything is computed per block of variants (variants × samples), so
memory is bounded by the block, and is vectorised over the block.

Assumptions, as in PLINK 2 by default: every sample is a founder (unrelated); genotypes are diploid.
Hardy-Weinberg is tested on autosomes only: chromosomes X, Y, XY and MT get no p-value and are never
removed by it (PLINK 2 tests X on females). On chromosome Y only males' calls count (PLINK 2): the
importer sets the others missing and leaves them out of every call rate. For a source with dosages: a
call is missing only when its dosage is missing (as PLINK 2's ``--mind dosage``/``--geno dosage``; plain
``--geno`` would also count every dosage far from an integer, most of an imputed file); allele
frequencies use the dosages; Hardy-Weinberg uses hard calls, a dosage further than `HARDCALL_THRESHOLD`
from an integer counting as missing there (PLINK 2's ``--hard-call-threshold`` default).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy.special import gammaln

from endopheno.errors import EndophenoError
from endopheno.params import from_section
from endopheno.genotypes.sources import MISSING

HARDCALL_THRESHOLD = 0.1
NON_AUTOSOMES = {"X", "Y", "XY", "MT", "M", "23", "24", "25", "26"}  # PLINK's numeric codes 23-26 included
# Relative tolerance when comparing probabilities of het counts: two counts whose probabilities are
# equal mathematically must both enter the p-value, whatever the rounding of their logarithms.
_TIE = 1e-7


@dataclass(frozen=True)
class QCParams:
    """Thresholds; `None` disables a filter. Defaults are PLINK's usual ones.

    mind: remove samples whose share of missing calls exceeds this. geno: the same for variants.
    hwe_p: remove variants whose Hardy-Weinberg exact p-value is below this. min_maf, min_mac: remove
    variants whose minor allele frequency / count is below this.
    """

    mind: float | None = 0.1
    geno: float | None = 0.1
    hwe_p: float | None = 1e-6
    min_maf: float | None = 0.01
    min_mac: float | None = 1

    @classmethod
    def from_dict(cls, d: dict | None) -> QCParams:
        p = from_section(cls, d, "genotypes.qc")
        for name, value in asdict(p).items():
            if value is not None and not (0 <= value <= (np.inf if name == "min_mac" else 1)):
                raise EndophenoError(f"genotypes.qc.{name}: {value} is out of range")
        return p


def _chromosome_codes(chrom) -> pd.Series:
    return pd.Series(np.asarray(chrom), dtype=str).str.upper().str.removeprefix("CHR")


def sex_chromosome(chrom) -> np.ndarray:
    """Per variant: "X", "Y" or "" (any other chromosome); PLINK's codes 23, 24 and a 'chr' prefix understood.
    XY (the pseudo-autosomal region) is diploid in both sexes, so it is "" here."""
    code = _chromosome_codes(chrom)
    return np.select([code.isin(["X", "23"]).to_numpy(), code.isin(["Y", "24"]).to_numpy()], ["X", "Y"], "")


def counted_missing(missing: np.ndarray, on_y: np.ndarray, male: np.ndarray) -> np.ndarray:
    """Per sample, the missing calls of a block (variants × samples mask) that count: on chromosome Y
    (`on_y`, per variant) only a male's (`male`, per sample), as in PLINK 2."""
    return missing[~on_y].sum(0) + missing[on_y].sum(0) * male


def missing_calls(block: np.ndarray) -> np.ndarray:
    """Boolean mask of missing calls in a block of hard calls (int8, `MISSING`) or dosages (NaN)."""
    return block == MISSING if block.dtype == np.int8 else np.isnan(block)


def variant_counts(block: np.ndarray) -> pd.DataFrame:
    """Per variant of a (variants × samples) block: `called` (non-missing calls), `a1` (count or dosage
    sum of allele1), and hard-call genotype counts `hom1` (two copies of allele1), `het`, `hom2`."""
    if block.dtype == np.int8:
        hom1, het, hom2 = ((block == k).sum(1) for k in (2, 1, 0))
        called = hom1 + het + hom2
        a1 = 2 * hom1 + het
    else:
        called = (~np.isnan(block)).sum(1)
        a1 = np.nansum(block, axis=1, dtype=np.float64)
        hard = np.rint(block)
        certain = np.abs(block - hard) <= HARDCALL_THRESHOLD  # False for NaN
        hom1, het, hom2 = ((certain & (hard == k)).sum(1) for k in (2, 1, 0))
    return pd.DataFrame({"called": called, "a1": a1, "hom1": hom1, "het": het, "hom2": hom2})


def variant_stats(counts: pd.DataFrame, chrom: np.ndarray, n_samples) -> pd.DataFrame:
    """Allele1 frequency among non-missing calls, minor allele count, call rate and Hardy-Weinberg
    exact p-value (autosomes only) of every variant, from `variant_counts` over `n_samples` samples (one
    number, or one per variant)."""
    alleles = 2 * counts["called"].to_numpy()
    a1 = counts["a1"].to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        freq = np.where(alleles > 0, a1 / alleles, np.nan)
    autosomal = ~_chromosome_codes(chrom).isin(NON_AUTOSOMES).to_numpy()
    hwe = np.full(len(counts), np.nan)
    hwe[autosomal] = hwe_exact(*(counts[c].to_numpy()[autosomal] for c in ("hom1", "het", "hom2")))
    return pd.DataFrame({"a1_freq": freq, "mac": np.minimum(a1, alleles - a1),
                         "call_rate": counts["called"].to_numpy() / np.maximum(n_samples, 1), "hwe_p": hwe})


def sample_filter(call_rate: np.ndarray, params: QCParams) -> np.ndarray:
    """Reason each sample is removed ("mind"), or "" for a kept one."""
    reason = np.full(len(call_rate), "", dtype=object)
    if params.mind is not None:
        reason[1 - call_rate > params.mind] = "mind"
    return reason


def variant_filter(stats: pd.DataFrame, params: QCParams) -> np.ndarray:
    """Reason each variant is removed ("geno", "hwe", "maf", "mac": the first filter it fails, in
    PLINK 2's order), or "" for a kept one. A variant without any call fails the frequency filters."""
    maf = np.minimum(stats["a1_freq"], 1 - stats["a1_freq"]).to_numpy()
    checks = [
        ("geno", params.geno, lambda t: 1 - stats["call_rate"].to_numpy() > t),
        ("hwe", params.hwe_p, lambda t: stats["hwe_p"].to_numpy() < t),  # NaN (not tested) never fails
        ("maf", params.min_maf, lambda t: ~(maf >= t)),
        ("mac", params.min_mac, lambda t: ~(stats["mac"].to_numpy() >= t)),
    ]
    reason = np.full(len(stats), "", dtype=object)
    for name, threshold, fails in checks:
        if threshold is not None:
            reason[(reason == "") & fails(threshold)] = name
    return reason


def hwe_exact(hom1: np.ndarray, het: np.ndarray, hom2: np.ndarray) -> np.ndarray:
    """Hardy-Weinberg equilibrium exact test, two-sided p-value per variant.

    The exact test of Wigginton, Cutler & Abecasis (2005), "A note on exact tests of Hardy-Weinberg
    equilibrium", Am J Hum Genet 76:887, the one PLINK's ``--hardy``/``--hwe`` use (without mid-p):
    given the number of genotypes n and the count of the rarer allele, the het count follows a known
    distribution under HWE, and the p-value is the total probability of het counts no more likely than
    the one observed. Assumes unrelated diploid individuals. The distribution depends only on (n, rare
    allele count), so it is computed once per distinct pair and looked up for every variant sharing it;
    its cost is proportional to the rare allele count. Variants with no call get NaN.
    """
    hom1, het, hom2 = (np.asarray(x, dtype=np.int64) for x in (hom1, het, hom2))
    n = hom1 + het + hom2
    rare = np.minimum(2 * hom1 + het, 2 * hom2 + het)
    p = np.full(len(n), np.nan)
    keys, inverse = np.unique(np.stack([n, rare], axis=1), axis=0, return_inverse=True)
    inverse = inverse.ravel()
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(keys) + 1))
    for k, (n_k, rare_k) in enumerate(keys):
        if n_k == 0:
            continue
        rows = order[bounds[k]:bounds[k + 1]]
        p[rows] = _hwe_pvalues(int(n_k), int(rare_k))[het[rows]]
    return p


@functools.lru_cache(maxsize=1 << 16)
def _hwe_pvalues(n: int, rare: int) -> np.ndarray:
    """p-value of each possible het count (the index; impossible counts NaN) for n genotypes carrying
    `rare` copies of the rarer allele (Wigginton et al. 2005, eq. 2, in log space with gammaln)."""
    common = 2 * n - rare
    het = np.arange(rare % 2, rare + 1, 2)
    log_prob = het * np.log(2.0) - gammaln(het + 1) - gammaln((rare - het) // 2 + 1) - gammaln((common - het) // 2 + 1)
    prob = np.exp(log_prob - log_prob.max())
    prob /= prob.sum()
    ascending = np.sort(prob)
    tail = np.cumsum(ascending)
    at_most = np.searchsorted(ascending, prob * (1 + _TIE), side="right")
    out = np.full(rare + 1, np.nan)
    out[het] = np.minimum(tail[at_most - 1], 1.0)
    return out
