"""Phenotype and covariate tables with PLINK 2's conventions, aligned to the genotype samples.

A table has a header line. If that line holds a tab, fields are split on single tabs (so an empty field is
missing); otherwise on runs of spaces/tabs, so whitespace-aligned tables read as PLINK 2 reads them. Its
ID columns come first: ``IID`` alone, or ``FID``/``#FID`` then ``IID`` (``#IID`` also accepted). Missing
values are ``NA``, ``nan``, empty or ``-9``, in phenotype and covariate columns alike (PLINK 2's
``--input-missing-phenotype`` default applies to ``--covar`` too). A non-numeric covariate column is
dummy-coded (first level dropped); a non-numeric phenotype is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from endopheno.errors import InputError

MISSING_STRINGS = ["NA", "na", "NaN", "nan", ""]


@dataclass
class Aligned:
    """Values aligned with the genotype samples (NaN where a sample has no value)."""

    values: np.ndarray
    names: list[str]
    unmatched: list[str] = field(default_factory=list)  # table rows whose ID is not a genotyped sample
    source: str = ""  # the file it was read from, for messages


def read_table(path: str | Path, columns: list[str] | None = None, *, kind: str = "phenotype") -> pd.DataFrame:
    """Read a PLINK-style table; return it indexed by (FID, IID) or IID, with the chosen value columns."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "not found")
    with open(path, errors="replace") as f:
        header_line = f.readline()
    try:
        table = pd.read_csv(path, sep="\t" if "\t" in header_line else r"\s+", engine="c", dtype=str,
                            keep_default_na=False)
    except Exception as e:
        raise InputError(path, f"cannot be parsed as a table ({e})") from None
    header = [c.lstrip("#") for c in table.columns]
    table.columns = header
    if "IID" not in header or header.index("IID") > 1 or (header.index("IID") == 1 and header[0] != "FID"):
        raise InputError(path, "the header must start with IID, or FID then IID (optionally prefixed by #)")
    ids = ["FID", "IID"] if header[0] == "FID" else ["IID"]
    if table.duplicated(ids).any():
        raise InputError(path, f"sample {table.loc[table.duplicated(ids), 'IID'].iloc[0]} appears more than once")
    available = [c for c in header if c not in ids]
    columns = columns or available
    absent = [c for c in columns if c not in available]
    if absent:
        raise InputError(path, f"no column {', '.join(absent)} (it has: {', '.join(available)})")
    values = table.set_index(ids)[columns].replace(MISSING_STRINGS, np.nan)
    out = _numeric(values, path, kind)
    out.attrs["path"] = str(path)
    return out


def _numeric(values: pd.DataFrame, path: Path, kind: str) -> pd.DataFrame:
    out = {}
    for name in values.columns:
        column = pd.to_numeric(values[name], errors="coerce")
        raw = values[name].mask(column == -9)  # -9 is missing (PLINK 2), in a categorical column too
        bad = column.isna() & raw.notna()
        if not bad.any():
            out[name] = column.mask(column == -9)
        elif kind == "covariate":  # categorical: dummy-code, missing stays missing
            dummies = pd.get_dummies(raw, prefix=name, drop_first=True, dtype=float)
            dummies[raw.isna()] = np.nan
            out.update({c: dummies[c] for c in dummies.columns})
        else:
            row = values.index[bad.to_numpy().argmax()]
            raise InputError(path, f"{kind} {name} of sample {row if isinstance(row, str) else row[-1]} "
                             f"is not a number ({raw[bad].iloc[0]!r})")
    return pd.DataFrame(out, index=values.index)


def align(table: pd.DataFrame, samples: pd.DataFrame) -> Aligned:
    """Rows of `table` in the order of the genotype `samples` (fid, iid); NaN for samples it lacks."""
    if table.index.nlevels == 2:
        keys = pd.MultiIndex.from_arrays([samples["fid"].astype(str), samples["iid"].astype(str)])
        names = [f"{f} {i}" for f, i in table.index]
    else:
        keys = pd.Index(samples["iid"].astype(str))
        names = list(table.index)
    aligned = table.reindex(keys)
    unmatched = [n for n, hit in zip(names, table.index.isin(keys)) if not hit]
    return Aligned(aligned.to_numpy(dtype=np.float64), list(table.columns), unmatched, table.attrs.get("path", ""))


def screen(phenotypes: Aligned, max_tied_fraction: float = 0.5,
           covariates: Aligned | None = None) -> tuple[Aligned, dict[str, str]]:
    """Phenotypes fit for a linear-model GWAS, and why each other one is left out.

    Linear regression assumes a roughly continuous outcome. A deep network's feature can be zero for almost
    every subject (a ReLU unit that fires for two of 400): regressed on a variant whose few carriers are
    those subjects, it gives t-statistics in the hundreds that mean nothing. Such a phenotype — fewer than
    two distinct values, or one value shared by more than `max_tied_fraction` of its observed samples — is
    not tested; nor is one the covariates explain entirely (nothing left to associate: t would be 0/0). (UK Biobank's imaging GWAS screens its IDPs likewise before a rank-based transform;
    Elliott et al. 2018, Nature 562:210.)"""
    keep, left_out = [], {}
    for j, name in enumerate(phenotypes.names):
        values = phenotypes.values[:, j]
        values = values[~np.isnan(values)]
        if len(values) == 0:
            left_out[name] = "no observed value"
            continue
        _, counts = np.unique(values, return_counts=True)
        tied = counts.max() / len(values)
        if len(counts) < 2:
            left_out[name] = "constant"
        elif tied > max_tied_fraction:
            left_out[name] = f"{tied:.0%} of its samples share one value (> {max_tied_fraction:.0%}: not continuous)"
        elif covariates is not None and _explained(phenotypes.values[:, j], covariates.values):
            left_out[name] = "explained entirely by the covariates"
        else:
            keep.append(j)
    return Aligned(phenotypes.values[:, keep], [phenotypes.names[j] for j in keep], phenotypes.unmatched,
                   phenotypes.source), left_out


def _explained(y: np.ndarray, covariates: np.ndarray) -> bool:
    rows = ~np.isnan(y) & ~np.isnan(covariates).any(axis=1)
    design = np.hstack([np.ones((rows.sum(), 1)), covariates[rows]])
    if design.shape[1] >= len(design):   # too few samples to tell: the scan reports "too few observations"
        return False
    centred = y[rows] - y[rows].mean()
    residual = centred - design @ np.linalg.lstsq(design, centred, rcond=None)[0]
    return float(residual @ residual) <= 1e-10 * float(centred @ centred)


def inverse_normal(phenotypes: Aligned) -> Aligned:
    """Rank-based inverse normal transformation of each phenotype: Φ⁻¹((rank − 3/8) / (n + 1/4)) over its
    observed samples (Blom 1958; ties get their mean rank), so that heavy tails and outliers cannot drive
    the linear model's t-statistics (Beasley et al. 2009, Behav Genet 39:580; UK Biobank's IDP GWAS).
    The effect sizes are then in units of the transformed phenotype's SD."""
    from scipy import stats

    values = phenotypes.values.copy()
    for j in range(values.shape[1]):
        observed = ~np.isnan(values[:, j])
        ranks = stats.rankdata(values[observed, j])
        values[observed, j] = stats.norm.ppf((ranks - 0.375) / (observed.sum() + 0.25))
    return Aligned(values, phenotypes.names, phenotypes.unmatched, phenotypes.source)
