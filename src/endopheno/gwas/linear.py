"""The association kernel: all variant × phenotype linear regressions of one block of variants.

Model, for phenotype y, variant dosage g and covariates C (intercept first), fitted by ordinary least
squares on the samples where y, C and g are all observed — PLINK 2's ``--glm`` for quantitative traits:

    y = C γ + g β + ε,   ε ~ N(0, σ² I) independent across samples.

By Frisch–Waugh–Lovell, β and its standard error follow from g and y residualised on C. The
formulation of Hail's ``linear_regression_rows``, REGENIE (Mbatchou et al. 2021, Nat Genet 53:1097)
and BOLT-LMM (Loh et al. 2015, Nat Genet 47:284): phenotypes that share one sample set are residualised
once (ỹ = y − Q Qᵀ y, Q an orthonormal basis of C), and a whole block of variants is tested against all
of them with one matrix product G ỹ plus per-variant side terms:

    gᵀỹ,   g̃ᵀg̃ = gᵀg − ‖Qᵀg‖²,   ỹᵀỹ,   β = gᵀỹ / g̃ᵀg̃,
    σ̂² = (ỹᵀỹ − β gᵀỹ) / (n − k − 1),   SE = √(σ̂² / g̃ᵀg̃),   t = β / SE,

with k the number of columns of C; p from Student's t with n − k − 1 degrees of freedom.

Missing genotypes, exact (the default): PLINK drops a sample from the regression of a variant whose call
is missing, which changes the covariate projection for that variant. With missing calls zero-filled, gᵀỹ
and Qᵀg are already sums over the observed samples S; what differs is the projection, which a rank-m
downdate restores, m being the number of missing calls (M = the missing samples, Qᵀỹ = 0):

    A = Q_Sᵀ Q_S = I − Q_Mᵀ Q_M,   u = Q_Mᵀ ỹ_M  (so Q_Sᵀ ỹ_S = −u),   w = Qᵀg,
    g̃ᵀỹ = gᵀỹ + wᵀA⁻¹u,   g̃ᵀg̃ = gᵀg − wᵀA⁻¹w,   ỹ_Sᵀỹ_S = ỹᵀỹ − Σ_M ỹ² − uᵀA⁻¹u.

Where A is singular — the covariates collinear on S, e.g. one constant on the called samples — the
variant is not tested (PLINK 2's VIF_INFINITE). All Q_M-sums of a block come from one sparse
(missing-indicator) × dense product, so the correction costs O(missing calls × (k·P + P + k²)) — about
1/N of the main product per missing call — and no per-variant Python loop. Mean imputation
(``missing="mean"``) instead fills a missing call with the variant's mean observed dosage and keeps every
sample (n = samples of the group).

Assumptions: linear additive model, independent homoscedastic errors, samples unrelated (no kinship
modelling; use PCs as covariates for structure). Sex chromosomes as PLINK 2 models them
(`sex_chromosome_model`): sex is a covariate on chrX, chrY is tested on males as haploid.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse
from scipy import special

from endopheno.errors import InputError
from endopheno.genotypes.sources import MISSING

# A variant is untestable when what remains of its dosage variance after projecting out the covariates is
# below this share of its raw sum of squares: constant among the observed samples, or collinear with C.
COLLINEAR_TOLERANCE = 1e-8
# The covariates are collinear on a variant's called samples when the smallest eigenvalue of Q_SᵀQ_S (see
# `_exact_correction`) is below this.
SINGULAR_TOLERANCE = 1e-10
log = logging.getLogger(__name__)


@dataclass
class PhenotypeGroup:
    """Phenotypes observed on the same samples, residualised together.

    `samples`: indices into the genotype source's samples; `q`: (n × k) orthonormal basis of intercept +
    covariates on those samples; `y`: (n × P) residualised phenotypes; `yy`: their sums of squares.
    """

    names: list[str]
    samples: np.ndarray
    q: np.ndarray
    y: np.ndarray
    yy: np.ndarray
    all_samples: bool = False
    _side: np.ndarray | None = None
    _operands: dict | None = None

    @property
    def k(self) -> int:
        return self.q.shape[1]

    def operand(self, precision: str) -> np.ndarray:
        """The right-hand side of the big product, [ỹ | Q], so that one GEMM gives gᵀỹ and Qᵀg. Cached,
        so that a device copy of it can be reused across blocks."""
        self._operands = self._operands or {}
        if precision not in self._operands:
            self._operands[precision] = np.hstack([self.y, self.q]).astype(precision)
        return self._operands[precision]

    def side(self, missing: str) -> np.ndarray:
        """Per-sample terms whose sums over the missing samples the missing-genotype correction needs."""
        if self._side is None:
            n, k, p = self.y.shape[0], self.k, self.y.shape[1]
            if missing == "exact":  # columns: Q_k ⊙ ỹ for every k, ỹ², Q_k Q_l for every k, l
                qy = (self.q[:, :, None] * self.y[:, None, :]).reshape(n, k * p)
                qq = (self.q[:, :, None] * self.q[:, None, :]).reshape(n, k * k)
                self._side = np.hstack([qy, self.y**2, qq])
            else:  # mean imputation: ỹ and Q
                self._side = np.hstack([self.y, self.q])
        return self._side


def phenotype_groups(phenotypes: np.ndarray, covariates: np.ndarray, names: list[str],
                     covariate_names: list[str] | None = None, covariate_source: str | None = None,
                     left_out: dict[str, str] | None = None) -> list[PhenotypeGroup]:
    """Group phenotypes by missingness and residualise each group on intercept + covariates.

    As PLINK 2's ``--glm`` does, a covariate constant or collinear with the others on the samples of one
    group is left out of that group's model (a line is logged), and a group with too few samples for its
    model is not tested: its phenotypes and the reason go into `left_out` (name -> reason). A covariate
    collinear with the others on every sample is the covariate file's mistake (`InputError`).

    Parameters
    ----------
    phenotypes : (samples × P) float array aligned with the genotype source's samples, NaN = missing.
    covariates : (samples × c) float array aligned likewise; a sample missing any covariate is left out.
    names : the P phenotype names; `covariate_names` name the covariates, `covariate_source` their file,
        in messages.
    """
    left_out = {} if left_out is None else left_out
    labels = ["intercept", *(covariate_names or [f"covariate {i + 1}" for i in range(covariates.shape[1])])]
    usable = ~np.isnan(covariates).any(axis=1)
    everywhere = deficient_columns(covariates[usable])
    collinear = [labels[i] for i in np.flatnonzero(everywhere) if np.ptp(covariates[usable, i - 1]) > 0]
    if collinear:  # PLINK 2 stops here too ("covariate correlation matrix could not be inverted")
        raise InputError(covariate_source or "covariates", f"{', '.join(collinear)} collinear with the other "
                         f"covariates on every sample; remove {'it' if len(collinear) == 1 else 'them'}")
    observed = ~np.isnan(phenotypes) & usable[:, None]
    patterns: dict[bytes, list[int]] = {}
    for j in range(phenotypes.shape[1]):
        patterns.setdefault(np.packbits(observed[:, j]).tobytes(), []).append(j)
    groups = []
    for columns in patterns.values():
        group_names = [names[j] for j in columns]
        samples = np.flatnonzero(observed[:, columns[0]])
        kept = ~deficient_columns(covariates[samples])
        for i in np.flatnonzero(~kept):
            log.warning("Not including covariate '%s' in the regression on phenotype '%s'%s: constant or collinear "
                        "with the others on its %d samples", labels[i], group_names[0],
                        f" (and {len(columns) - 1} more)" if len(columns) > 1 else "", len(samples))
        design = np.hstack([np.ones((len(samples), 1)), covariates[samples]])[:, kept]
        if len(samples) < design.shape[1] + 2:  # the genotype's coefficient too, and one degree of freedom
            reason = ("no sample has the phenotype and every covariate observed" if not len(samples) else
                      f"{len(samples)} samples with the phenotype and every covariate observed: too few for a "
                      f"model with {design.shape[1] + 1} coefficients")
            log.warning("phenotype '%s'%s not tested: %s", group_names[0],
                        f" (and {len(columns) - 1} more)" if len(columns) > 1 else "", reason)
            left_out.update(dict.fromkeys(group_names, reason))
            continue
        q, _ = np.linalg.qr(design)
        y = phenotypes[np.ix_(samples, columns)]
        y = y - q @ (q.T @ y)
        groups.append(PhenotypeGroup(names=group_names, samples=samples, q=np.ascontiguousarray(q),
                                     y=np.ascontiguousarray(y), yy=np.einsum("np,np->p", y, y),
                                     all_samples=len(samples) == phenotypes.shape[0]))
    return groups


def deficient_columns(covariates: np.ndarray) -> np.ndarray:
    """Which columns of [1, covariates] are constant or collinear with the columns before them on these
    samples (none when there are too few samples to tell): a zero diagonal entry of R in their QR."""
    design = np.hstack([np.ones((len(covariates), 1)), covariates])
    if len(design) <= design.shape[1]:
        return np.zeros(design.shape[1], dtype=bool)
    r = np.linalg.qr(design, mode="r")
    return np.abs(np.diag(r)) <= 1e-10 * max(1.0, np.abs(r).max())


def sex_chromosome_model(kind: str, sex: np.ndarray, covariates: np.ndarray, names: list[str]):
    """Covariates, their names and the usable samples for variants of chromosome `kind` ("" autosomal, "X",
    "Y"; see `genotypes.qc.sex_chromosome`), as PLINK 2's ``--glm`` models them: on chrX, sex (1 male,
    2 female) is one more covariate — unless the covariates hold it already — and samples of unknown sex
    are left out; chrY is tested on males only, its calls counted as haploid (0 or 1: the returned dosage
    scale is 1/2). A male's chrX call is used as coded (0 or 2 in a .bed), as PLINK 2 does; a constant sex
    is dropped by `phenotype_groups`, with a line saying so. Returns (covariates, names, usable, scale)."""
    usable = np.ones(len(sex), dtype=bool)
    if kind == "X":
        usable = np.isin(sex, (1, 2))
        with_sex = np.hstack([covariates, np.where(usable, sex, np.nan)[:, None]])
        known = with_sex[~np.isnan(with_sex).any(axis=1)]
        if not (len(known) and deficient_columns(known)[-1] and np.ptp(known[:, -1]) > 0):
            covariates, names = with_sex, [*names, "sex"]
    elif kind == "Y":
        usable = sex == 1
    return covariates, names, usable, 0.5 if kind == "Y" else 1.0


@dataclass
class BlockResult:
    """Statistics of one block for one group: arrays are (variants × phenotypes); `n` and `a1_freq` are
    per variant. `reason` is empty for a tested variant, else why it could not be tested."""

    names: list[str]
    n: np.ndarray
    a1_freq: np.ndarray
    beta: np.ndarray
    se: np.ndarray
    t_stat: np.ndarray
    p: np.ndarray
    log10_p: np.ndarray
    reason: np.ndarray


def decode(dosages: np.ndarray, dtype=np.float64):
    """Zero-filled dosages, missing-call indicator (sparse), Σg, Σg² and missing counts per variant."""
    m, n = dosages.shape
    g = _buffer((m, n), dtype)
    np.copyto(g, dosages, casting="unsafe")
    if dosages.dtype == np.int8:
        # min() is one fast pass; locating the missing calls is skipped for the (usual) complete block.
        flat = np.flatnonzero(dosages == MISSING) if dosages.size and dosages.min() == MISSING else np.empty(0, np.int64)
        rows, cols = np.divmod(flat, n)
        g.flat[flat] = 0
        n_missing = np.bincount(rows, minlength=m)
        s1 = dosages.sum(axis=1, dtype=np.int64) - int(MISSING) * n_missing  # missing calls add MISSING each
        s2 = s1 + 2 * np.count_nonzero(dosages == 2, axis=1)  # 1² = 1, 2² = 2 + 2
        s1, s2 = s1.astype(np.float64), s2.astype(np.float64)
    else:
        rows, cols = np.nonzero(np.isnan(dosages))
        g[rows, cols] = 0
        n_missing = np.bincount(rows, minlength=m)
        s1 = g.sum(axis=1, dtype=np.float64)
        s2 = np.einsum("ij,ij->i", g, g, dtype=np.float64)
    indptr = np.concatenate([[0], np.cumsum(n_missing)])  # rows come sorted: CSR without a sort
    indicator = scipy.sparse.csr_matrix((np.ones(len(cols)), cols, indptr), shape=(m, n)) if len(rows) else None
    return g, indicator, s1, s2, n_missing


_buffers = threading.local()


def _buffer(shape: tuple[int, int], dtype) -> np.ndarray:
    """A decode buffer reused by each thread: a fresh 100+ MB array per block costs more in page faults
    than the decoding itself."""
    key = (np.dtype(dtype).str, shape[1])
    cache = _buffers.__dict__
    if key not in cache or cache[key].shape[0] < shape[0]:
        cache[key] = np.empty(shape, dtype=dtype)
    return cache[key][: shape[0]]


def associate_block(dosages: np.ndarray, group: PhenotypeGroup, *, missing: str = "exact",
                    precision: str = "float64", product=None, laps: Laps | None = None) -> BlockResult:
    """Test every variant of `dosages` (variants × all samples) against every phenotype of `group`.

    `product(g, y)` computes the big matrix product; the default is numpy (BLAS). The GPU path passes a
    torch implementation. `precision="float32"` does that product in single precision; every side
    term stays in float64. `laps`, if given, accumulates the seconds spent in each phase.
    """
    lap = laps or Laps(None)
    block = dosages if group.all_samples else dosages[:, group.samples]
    dtype = np.float32 if precision == "float32" else np.float64
    g, indicator, s1, s2, n_missing = decode(block, dtype)
    lap("decode")
    n = group.y.shape[0] - n_missing
    k = group.k
    product = product or _numpy_product
    both = product(g, group.operand(precision))
    gy, w = both[:, : group.y.shape[1]].astype(np.float64), both[:, group.y.shape[1]:].astype(np.float64)
    if dtype == np.float32:
        # Q's first column is the constant 1/√n (QR of [1, C]): its product is Σg·q₀, exact from the counts.
        # The other columns sum to zero, so float32 keeps them accurate; the constant one would not,
        # and g̃ᵀg̃ = gᵀg − ‖w‖² would cancel badly (constant variants would look testable).
        w[:, 0] = s1 * group.q[0, 0]
    del g
    lap("product")
    gg = s2 - np.einsum("mk,mk->m", w, w)
    yy = np.broadcast_to(group.yy, gy.shape).copy()
    a1_freq = np.divide(s1, 2.0 * n, out=np.full(len(n), np.nan), where=n > 0)

    singular = np.zeros(len(n), dtype=bool)
    if indicator is not None:
        rows = np.flatnonzero(n_missing)
        # In CSC form the product walks the samples in order, so each row of the (n × ~kP) side matrix
        # is read once: 2.3× faster than CSR, whose random reads of it miss the cache.
        sums = np.asarray(indicator[rows].tocsc() @ group.side(missing))
        if missing == "exact":
            singular[rows] = _exact_correction(rows, sums, w, gy, gg, yy, s2, k, group.y.shape[1])
        else:
            _mean_imputation(rows, sums, n_missing, s1, w, gy, gg, s2, group)
            n = np.full_like(n, group.y.shape[0])
    lap("missing correction")
    result = _statistics(group.names, n, k, a1_freq, gy, gg, yy, s2, singular)
    lap("statistics and p")
    return result


class Laps:
    """Adds the seconds since the previous lap to ``timer[name]`` (a no-op without a timer)."""

    def __init__(self, timer: dict | None):
        self.timer, self.t = timer, time.perf_counter()

    def __call__(self, name: str) -> None:
        if self.timer is not None:
            now = time.perf_counter()
            self.timer[name] = self.timer.get(name, 0.0) + now - self.t
            self.t = now


def _exact_correction(rows, sums, w, gy, gg, yy, s2, k, p):
    """Restore, for variants with missing calls, the regression on the observed samples only. Returns, per
    row, whether the covariates are collinear on the called samples (A = Q_SᵀQ_S singular: a covariate
    constant on them, say; PLINK 2's VIF_INFINITE): such a variant cannot be tested. A solve would not fail
    there but give an answer with one degree of freedom too few."""
    u = sums[:, : k * p].reshape(-1, k, p)
    y2 = sums[:, k * p: k * p + p]
    a = np.eye(k) - sums[:, k * p + p:].reshape(-1, k, k)
    # A's eigenvalues are the squared singular values of Q_S, in [0, 1] (Q is orthonormal): an absolute
    # tolerance suffices. Singular rows get A = I so the solves go through; their results are discarded.
    singular = np.linalg.eigvalsh(a)[:, 0] < SINGULAR_TOLERANCE
    a[singular] = np.eye(k)
    wm = w[rows]
    ainv_w = np.linalg.solve(a, wm[:, :, None])[:, :, 0]
    ainv_u = np.linalg.solve(a, u)
    gy[rows] += np.einsum("mk,mkp->mp", wm, ainv_u)
    gg[rows] = s2[rows] - np.einsum("mk,mk->m", wm, ainv_w)
    yy[rows] -= y2 + np.einsum("mkp,mkp->mp", u, ainv_u)
    return singular


def _mean_imputation(rows, sums, n_missing, s1, w, gy, gg, s2, group):
    """Missing calls take the variant's mean observed dosage (all samples kept)."""
    p = group.y.shape[1]
    observed = group.y.shape[0] - n_missing[rows]
    mean = np.divide(s1[rows], observed, out=np.zeros(len(rows)), where=observed > 0)
    gy[rows] += mean[:, None] * sums[:, :p]
    w[rows] += mean[:, None] * sums[:, p:]
    s2 = s2.copy()
    s2[rows] += mean**2 * n_missing[rows]
    gg[rows] = s2[rows] - np.einsum("mk,mk->m", w[rows], w[rows])


def _statistics(names, n, k, a1_freq, gy, gg, yy, s2, singular) -> BlockResult:
    df = (n - k - 1).astype(np.float64)
    reason = np.full(len(n), "", dtype=object)
    reason[singular] = "covariates constant or collinear on the samples with a call"
    reason[gg <= COLLINEAR_TOLERANCE * np.maximum(s2, 1.0)] = "constant or collinear with covariates"
    reason[df < 1] = "too few observations"
    ok = reason == ""
    with np.errstate(divide="ignore", invalid="ignore"):
        beta = gy / gg[:, None]
        rss = np.maximum(yy - beta * gy, 0.0)
        se = np.sqrt(rss / df[:, None] / gg[:, None])
        t = beta / se
    beta[~ok], se[~ok], t[~ok] = np.nan, np.nan, np.nan
    p, log10_p = t_test_p(t, df[:, None])
    return BlockResult(names, n.astype(np.int32), a1_freq, beta, se, t, p, log10_p, reason)


def t_test_p(t: np.ndarray, df: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided p of Student's t and −log10 p, exact even where p underflows double precision.

    p = I_x(df/2, 1/2) with x = df / (df + t²) (the regularised incomplete beta). Below 1e-300 its log
    comes from the identity I_x(a, b) = x^a (1−x)^b / (a B(a, b)) · ₂F₁(a+b, 1; a+1; x)
    (DLMF 8.17.8), so −log10 p stays exact for the strongest hits.
    """
    t, df = np.broadcast_arrays(np.asarray(t, dtype=np.float64), np.asarray(df, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        x = df / (df + t * t)
        a = df / 2
        p = special.betainc(a, 0.5, x)
        log10_p = -np.log10(p)
        tiny = p < 1e-300
        if tiny.any():
            at, xt = a[tiny], x[tiny]
            ln_p = (at * np.log(xt) + 0.5 * np.log1p(-xt) - np.log(at) - special.betaln(at, 0.5)
                    + np.log(special.hyp2f1(at + 0.5, 1.0, at + 1.0, xt)))
            log10_p[tiny] = -ln_p / np.log(10)
    return p, log10_p


def _numpy_product(g: np.ndarray, y: np.ndarray) -> np.ndarray:
    return g @ y
