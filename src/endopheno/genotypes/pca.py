"""Genetic principal components: LD pruning, then a randomised SVD of the standardised genotypes.

Standardisation follows Patterson, Price & Reich (2006), "Population structure and eigenanalysis",
PLoS Genet 2:e190: each variant is centred by twice its allele frequency p and divided by
sqrt(p(1 - p)); a missing call becomes 0 after centring (the mean). The sample PCs are the leading
right singular vectors of this variants × samples matrix, i.e. the eigenvectors of the genetic
relationship matrix (unit length, as PLINK's ``--pca`` and EIGENSOFT report them). Assumptions: the
pruned variants are roughly independent (LD pruning), common (MAF ≥ `min_maf`; rare variants add noise
and no ancestry signal), and the samples unrelated (close relatives form their own PCs). Long-range LD
regions (e.g. the MHC) are not excluded; on real data, drop them from the source if they dominate a PC.

The SVD is dask's randomised `svd_compressed` (Halko, Martinsson & Tropp 2011, SIAM Rev 53:217) with
power iterations and a seed, streaming over chunks of the store, so memory stays bounded by a chunk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from endopheno.errors import EndophenoError
from endopheno.params import from_section
from endopheno.genotypes.qc import missing_calls

log = logging.getLogger(__name__)
OVERSAMPLES = 10  # extra random directions of the randomised SVD (Halko et al.'s usual choice)


@dataclass(frozen=True)
class PCAParams:
    """pcs: number of PCs. min_maf: variants used must have at least this minor allele frequency.
    ld_window, ld_r2: LD pruning (see `LDPruner`). power_iterations: of the randomised SVD (more is
    more accurate; 4 brings the leading PCs to numerical agreement with an exact SVD)."""

    pcs: int = 10
    min_maf: float = 0.05
    ld_window: int = 50
    ld_r2: float = 0.2
    power_iterations: int = 4

    @classmethod
    def from_dict(cls, d: dict | None) -> PCAParams:
        p = from_section(cls, d, "genotypes.pca")
        if p.pcs < 0 or p.ld_window < 2 or not 0 < p.ld_r2 <= 1 or not 0 <= p.min_maf <= 0.5 or p.power_iterations < 0:
            raise EndophenoError(f"genotypes.pca: parameters out of range ({p})")
        return p


def standardise(block: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """Patterson et al. (2006) standardisation of a (variants × samples) block, missing calls -> 0."""
    freq = np.asarray(freq, dtype=np.float32).reshape(-1, 1)
    z = (block.astype(np.float32) - 2 * freq) / np.sqrt(freq * (1 - freq))
    z[missing_calls(block)] = 0
    return z


class LDPruner:
    """Greedy pairwise LD pruning over a stream of blocks of variants, in genome order.

    PLINK's ``--indep-pairwise <window> 1 <r2>`` criterion (a window counted in variants, moved one variant
    at a time: no two kept variants within a window are in stronger LD than `r2`) with a simpler, forward
    choice: a variant is kept unless its squared correlation with a variant already kept, among the
    previous ``window - 1`` variants on the same chromosome, exceeds `r2`. PLINK prunes each window's linked
    pairs by its own greedy rule and keeps fewer (on the phantom's 58,860 common variants `plink2
    --indep-pairwise 50 1 0.2` keeps 5,349, this 9,362); either set carries the ancestry the PCs need. Correlations are Pearson's over samples, missing calls
    replaced by the variant's mean. Blocks are fed with `add`; the last ``window - 1`` variants are
    carried over to the next block.
    """

    def __init__(self, window: int, r2: float):
        self.window, self.r2 = window, r2
        self._tail: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # unit rows, chromosomes, kept

    def add(self, z: np.ndarray, chrom: np.ndarray) -> np.ndarray:
        """Feed standardised rows `z` (variants × samples, missing = 0) and their chromosomes; return
        which of them are kept."""
        norm = np.linalg.norm(z, axis=1, keepdims=True)
        unit = np.divide(z, norm, out=np.zeros_like(z), where=norm > 0)
        chrom = np.asarray(chrom, dtype=str)
        if self._tail is not None:
            unit, chrom = np.vstack([self._tail[0], unit]), np.concatenate([self._tail[1], chrom])
            kept = np.concatenate([self._tail[2], np.zeros(len(z), bool)])
        else:
            kept = np.zeros(len(z), bool)
        start = len(unit) - len(z)
        linked = self._linked(unit, chrom, start)
        for i in range(start, len(unit)):
            partners = i - 1 - np.flatnonzero(linked[i - start])
            kept[i] = not kept[partners].any()
        keep = self.window - 1
        self._tail = (unit[-keep:], chrom[-keep:], kept[-keep:])
        return kept[start:]

    def _linked(self, unit: np.ndarray, chrom: np.ndarray, start: int) -> np.ndarray:
        """(rows from `start`) × (window - 1): is row i linked (r² > threshold, same chromosome) to row
        i - 1 - d? One row-wise dot product per lag, not small matrix products: those go through
        multithreaded BLAS, which ran 100 times slower when the cores were busy (measured on 2 cores)."""
        n = len(unit)
        out = np.zeros((n - start, self.window - 1), bool)
        for lag in range(1, self.window):
            first = max(start, lag)
            if first >= n:
                break
            r = np.einsum("ij,ij->i", unit[first:], unit[first - lag:n - lag])
            out[first - start:, lag - 1] = (r * r > self.r2) & (chrom[first:] == chrom[first - lag:n - lag])
        return out


def genetic_pcs(dosages, rows: np.ndarray, freq: np.ndarray, k: int, *, seed: int,
                power_iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Leading `k` principal components of the samples, from variants `rows` of `dosages`.

    Parameters
    ----------
    dosages : zarr.Array
        (variants × samples) hard calls or dosages, chunked along variants only.
    rows : int array
        The (LD-pruned, common) variants to use, sorted.
    freq : float array
        Their allele frequencies, for standardisation.
    k : int
        Number of PCs wanted; fewer are returned when the data cannot have that many (at most
        samples - 1, the rank of the centred matrix, and the number of variants).
    seed, power_iterations
        Of the randomised SVD: the same seed gives the same PCs.

    Returns
    -------
    pcs : (samples × k') float64 array of unit-length eigenvectors.
    explained : (k',) share of the standardised matrix's total variance that each PC explains.
    """
    import dask.array as da

    n_samples = dosages.shape[1]
    k = max(0, min(k, n_samples - 1, len(rows)))
    if k == 0:
        return np.empty((n_samples, 0)), np.empty(0)
    x = da.from_zarr(dosages)[np.asarray(rows)]
    f = da.from_array(np.asarray(freq, dtype=np.float32)[:, None], chunks=(x.chunks[0], 1))
    z = da.map_blocks(standardise, x, f, dtype=np.float32)
    oversamples = min(OVERSAMPLES, min(z.shape) - k)
    _, s, vt = da.linalg.svd_compressed(z, k, n_power_iter=power_iterations, n_oversamples=oversamples, seed=seed)
    total = (z.astype(np.float64) ** 2).sum()
    s, vt, total = da.compute(s, vt, total)
    # A PC's sign is arbitrary and dask's sign rule (on the variant side) flipped some between the
    # threaded and distributed schedulers: fix it on the sample side, the largest loading positive.
    vt = vt * np.sign(vt[np.arange(k), np.abs(vt).argmax(axis=1)])[:, None]
    return vt.T.astype(np.float64), (s.astype(np.float64) ** 2) / total
