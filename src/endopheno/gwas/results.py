"""What a scan means: genomic inflation, hits, independent loci, lead-variant models, plots.

Everything here reads ``OUT/results/`` with DuckDB (the scan's Parquet parts as one table), so it scales
with the number of tests without holding them in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
from scipy import stats

from endopheno.genotypes.qc import missing_calls, sex_chromosome
from endopheno.gwas.linear import sex_chromosome_model

MEDIAN_CHI2_1DF = stats.chi2.ppf(0.5, 1)  # 0.4549…


@dataclass
class ClumpParams:
    """PLINK ``--clump``'s knobs (Purcell et al. 2007, AJHG 81:559): a variant with p < `p1` not yet in a
    locus becomes the lead of a new one, which takes every variant within `kb` with p < `p2` and
    r² ≥ `r2` with the lead."""

    p1: float = 5e-8
    p2: float = 1e-2
    r2: float = 0.1
    kb: float = 500.0


def results_sql(out: str | Path) -> str:
    return f"read_parquet('{Path(out) / 'results'}/*.parquet')"


def lambda_gc(out: str | Path) -> pd.DataFrame:
    """Genomic inflation per phenotype: median χ²₁ of the p-values over 0.4549 (Devlin & Roeder 1999,
    Biometrics 55:997). Assumes most variants are null; ~1 means no inflation from structure."""
    table = duckdb.sql(f"""SELECT phenotype::VARCHAR AS phenotype, median(p) AS median_p, count(*) AS tests
                           FROM {results_sql(out)} WHERE reason IS NULL GROUP BY ALL ORDER BY phenotype""").df()
    table["lambda_gc"] = stats.chi2.isf(table["median_p"], 1) / MEDIAN_CHI2_1DF
    return table.drop(columns="median_p")


def hits(out: str | Path, threshold: float) -> pd.DataFrame:
    """Every variant × phenotype with p below `threshold`, strongest first."""
    return duckdb.sql(f"""SELECT phenotype::VARCHAR AS phenotype, chrom::VARCHAR AS chrom, pos, id::VARCHAR AS id,
                                 a1::VARCHAR AS a1, a2::VARCHAR AS a2, a1_freq, n, beta, se, t_stat, p, log10_p
                          FROM {results_sql(out)} WHERE p < {threshold!r}
                          ORDER BY log10_p DESC""").df()


def clump(out: str | Path, source, params: ClumpParams) -> pd.DataFrame:
    """Independent loci per phenotype, PLINK-style clumping with LD (r²) from the genotypes themselves.
    Variants are identified by their row in the source's variant table (`lead_variant`), not by ID, which
    may repeat ('.')."""
    candidates = duckdb.sql(f"""SELECT phenotype::VARCHAR AS phenotype, chrom::VARCHAR AS chrom, pos, id::VARCHAR AS id,
                                       variant, p, log10_p FROM {results_sql(out)}
                                WHERE p < {params.p2!r}""").df()
    loci = []
    for phenotype, table in candidates.groupby("phenotype", sort=True):
        table = table.sort_values("log10_p", ascending=False)
        taken: set[int] = set()
        for lead in table.itertuples():
            if lead.p >= params.p1:
                break
            if lead.variant in taken:
                continue
            near = table[(table.chrom == lead.chrom) & ((table.pos - lead.pos).abs() <= params.kb * 1000)]
            r2 = ld_r2(source, lead.variant, near.variant.to_numpy())
            members = near[(r2 >= params.r2) & ~near.variant.isin(taken)]  # the lead itself included (r² = 1)
            taken.update(members.variant)
            loci.append({"phenotype": phenotype, "chrom": lead.chrom, "lead_id": lead.id, "lead_variant": lead.variant,
                         "lead_pos": lead.pos, "p": lead.p, "log10_p": lead.log10_p, "variants": len(members),
                         "start": int(members.pos.min()), "end": int(members.pos.max())})
    columns = ["phenotype", "chrom", "lead_id", "lead_variant", "lead_pos", "p", "log10_p", "variants", "start", "end"]
    return pd.DataFrame(loci, columns=columns)


def ld_r2(source, lead: int, others: np.ndarray) -> np.ndarray:
    """Squared Pearson correlation of dosages between one variant and others, on samples called in both."""
    if len(others) == 0:
        return np.empty(0)
    lo, hi = int(min(lead, others.min())), int(max(lead, others.max())) + 1
    block = _as_float(source.read(lo, hi))
    x, ys = block[lead - lo], block[others - lo]
    both = ~np.isnan(x) & ~np.isnan(ys)
    x, ys = np.where(both, x, 0), np.where(both, ys, 0)
    n = both.sum(axis=1)
    mx, my = x.sum(axis=1) / n, ys.sum(axis=1) / n
    cov = (x * ys).sum(axis=1) / n - mx * my
    vx, vy = (x * x).sum(axis=1) / n - mx**2, (ys * ys).sum(axis=1) / n - my**2
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.nan_to_num(cov**2 / (vx * vy))


def _as_float(dosages: np.ndarray) -> np.ndarray:
    return np.where(missing_calls(dosages), np.nan, dosages.astype(np.float64))


def lead_models(loci: pd.DataFrame, source, phenotypes, covariates) -> pd.DataFrame:
    """The full regression of each locus's lead variant with statsmodels OLS, covariate terms included,
    on the samples where phenotype, covariates and genotype are all observed (as the scan does, sex
    chromosomes included: `sex_chromosome_model`)."""
    import statsmodels.api as sm

    sex = source.samples["sex"].to_numpy() if "sex" in source.samples else np.zeros(len(source.samples))
    rows = []
    for locus in loci.itertuples():
        v = int(locus.lead_variant)
        cov, cov_names, usable, scale = sex_chromosome_model(
            sex_chromosome([locus.chrom])[0], sex,
            covariates.values if covariates is not None else np.empty((len(source.samples), 0)),
            covariates.names if covariates is not None else [])
        g = _as_float(source.read(v, v + 1))[0] * scale
        y = phenotypes.values[:, phenotypes.names.index(locus.phenotype)]
        use = usable & ~np.isnan(y) & ~np.isnan(g) & ~np.isnan(cov).any(axis=1)
        design = pd.DataFrame({"intercept": 1.0, locus.lead_id: g[use], **dict(zip(cov_names, cov[use].T))})
        fit = sm.OLS(y[use], design).fit()
        for term in design.columns:
            rows.append({"phenotype": locus.phenotype, "lead_id": locus.lead_id, "lead_variant": v, "term": term,
                         "coef": fit.params[term], "se": fit.bse[term], "t_stat": fit.tvalues[term],
                         "p": fit.pvalues[term], "n": int(fit.nobs), "r2": fit.rsquared})
    return pd.DataFrame(rows, columns=["phenotype", "lead_id", "lead_variant", "term", "coef", "se", "t_stat", "p",
                                       "n", "r2"])


def manhattan(table: pd.DataFrame, path: str | Path, title: str, thresholds: dict[str, float]) -> Path:
    """Manhattan plot of −log10 p (columns chrom, pos, log10_p), chromosomes side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = table.assign(chrom_order=_chrom_order(table["chrom"])).sort_values(["chrom_order", "pos"])
    spans = table.groupby("chrom_order", sort=True)["pos"].max()
    offsets = spans.cumsum().shift(fill_value=0)
    x = table["pos"] + table["chrom_order"].map(offsets)
    fig, ax = plt.subplots(figsize=(11, 3.6), dpi=110)
    # One marker line per colour: Agg stamps a Line2D's markers from one cached glyph, 4x faster than
    # a scatter's per-point paths for the ~10^5 points of a scan, and the same picture.
    even = (table["chrom_order"] % 2 == 0).to_numpy()
    for part, colour in ((even, "#1f4e79"), (~even, "#6fa8dc")):
        ax.plot(x[part], table["log10_p"][part], "o", ms=1.7, mew=0, color=colour, rasterized=True)
    for (label, value), style in zip(thresholds.items(), ["--", ":"]):
        ax.axhline(-np.log10(value), color="#c0392b", lw=0.8, ls=style, label=f"{label} ({value:.2g})")
    names = table.groupby("chrom_order", sort=True)["chrom"].first()
    ax.set_xticks(offsets + spans / 2, names)
    ax.set_xlabel("chromosome")
    ax.set_ylabel("−log10 p")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def qq_points(out: str | Path, phenotypes: list[str], max_points: int = 200_000):
    """Per phenotype, the points of its QQ plot: ``(name, expected, observed)`` −log10 p, strongest first,
    for its 1000 strongest p-values and `max_points` / phenotypes evenly spaced ranks (at least 2000). Expected: the uniform order statistics (i − 0.5) / n."""
    # One pass over the results, each phenotype's values gathered as a list and sorted in numpy: an
    # ORDER BY over every test sorted 11.6 M rows by a string and took 4x as long (BENCHMARKS.md).
    grouped = duckdb.sql(f"SELECT phenotype::VARCHAR AS phenotype, list(log10_p) AS log10_p FROM {results_sql(out)} "
                         "WHERE reason IS NULL GROUP BY ALL").arrow().read_all()
    values = {name: lp.values.to_numpy() for name, lp in zip(grouped.column("phenotype").to_pylist(),
                                                              grouped.column("log10_p"))}
    per_phenotype = max(2000, max_points // max(1, len(phenotypes)))
    for name in phenotypes:
        lp = -np.sort(-values.get(name, np.empty(0)))
        expected = -np.log10((np.arange(1, len(lp) + 1) - 0.5) / len(lp))
        keep = np.unique(np.concatenate([np.arange(min(len(lp), 1000)),
                                         np.linspace(0, len(lp) - 1, min(len(lp), per_phenotype)).astype(int)]))
        yield name, expected[keep], lp[keep]


def qq(out: str | Path, path: str | Path, lambdas: pd.DataFrame) -> Path:
    """QQ plot of observed vs expected −log10 p for every phenotype of `lambdas` (`qq_points`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.8), dpi=110)
    top = 0.0
    for _, expected, observed in qq_points(out, list(lambdas["phenotype"])):
        ax.plot(expected, observed, ".", ms=2, alpha=0.5 if len(lambdas) > 1 else 1)
        top = max(top, expected[0] if len(expected) else 0)
    ax.plot([0, top], [0, top], color="black", lw=0.8)
    lam = lambdas["lambda_gc"]
    ax.set_title(f"QQ, {len(lambdas)} phenotype(s): λGC " +
                 (f"{lam.iloc[0]:.3f}" if len(lam) == 1 else f"{lam.min():.3f}–{lam.max():.3f}"), fontsize=10)
    ax.set_xlabel("expected −log10 p")
    ax.set_ylabel("observed −log10 p")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _chrom_order(chrom: pd.Series) -> pd.Series:
    """1..22, X, Y, XY, MT in that order (numbers numerically), anything else after."""
    special = {"X": 23, "Y": 24, "XY": 25, "MT": 26, "M": 26}
    key = chrom.astype(str).str.removeprefix("chr")
    return key.map(lambda c: int(c) if c.isdigit() else special.get(c, 27)).astype(int)
