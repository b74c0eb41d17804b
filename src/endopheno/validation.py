"""Validation of the whole chain on a cohort whose truth is known (the phantom): are the planted causal
loci found, and is anything found that was not planted?

The pipeline never reads the truth; this room does, after the GWAS. For one feature set's GWAS folder
(``endopheno gwas --out``) and the planted variants (``ground_truth/causal_variants.tsv``: chrom, pos,
id, region):

- a planted locus is **found** when a lead variant of a study-wide locus (``loci.parquet``,
  ``study_wide``: p below genome-wide / number of phenotypes) of *any* phenotype of the set lies within
  `window_kb` (500 kb, the clumping window) of the planted variant — a latent dimension has no region to
  match, so no phenotype is required to be "the right one";
- every other study-wide lead is a **false** one; leads on the same chromosome within `window_kb` of each
  other (one signal seen by several phenotypes) count as one false locus;
- λGC is the median over the set's phenotypes (`endopheno.gwas.results.lambda_gc`);
- for every planted variant, found or not, how far it was from the threshold: the strongest association
  of any phenotype within `window_kb` (``best_phenotype``, ``best_p``; with many phenotypes and variants in
  a window, chance alone reaches ~1e-6 here) and at the planted variant itself (``p_at_variant``, the
  smallest over the phenotypes).

Assumes planted variants lie further apart than 2 × `window_kb` (the phantom plants one per chromosome),
so that one lead cannot stand for two of them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from endopheno.errors import InputError
from endopheno.gwas.results import results_sql


@dataclass(frozen=True)
class ValidateParams:
    """The `validate` section of params.yaml."""

    causal: str = ""                    # the planted variants: a TSV with chrom, pos, id, region
    feature_sets: list = field(default_factory=list)
    gwas: str = "stores/gwas"
    window_kb: float = 500.0
    out: str = "stores/validation"


LOCI_COLUMNS = ["feature_set", "kind", "region", "planted_variant", "chrom", "pos", "found", "phenotype",
                "lead_id", "distance_kb", "p", "best_phenotype", "best_p", "p_at_variant"]


def read_causal(path: str | Path) -> pd.DataFrame:
    """The planted variants: a TSV with columns chrom, pos, id, region (the phantom's causal_variants.tsv)."""
    try:
        causal = pd.read_csv(path, sep="\t", dtype={"chrom": str})
    except (OSError, ValueError) as e:
        raise InputError(path, f"cannot read the planted variants ({e})") from None
    if missing := {"chrom", "pos", "id", "region"} - set(causal.columns):
        raise InputError(path, f"the planted-variant table needs columns {', '.join(sorted(missing))}")
    return causal


def score_loci(loci: pd.DataFrame, causal: pd.DataFrame, window_kb: float = 500.0) -> pd.DataFrame:
    """One row per planted variant (kind ``planted``: found or not, by its nearest strongest lead) and one
    per false locus (kind ``false``: its strongest lead), columns `LOCI_COLUMNS` but ``feature_set``.
    `loci` are the study-wide loci of one set (columns phenotype, chrom, lead_id, lead_pos, p)."""
    loci = loci.assign(chrom=loci["chrom"].astype(str), planted=False)
    rows = []
    for v in causal.itertuples():
        distance = (loci["lead_pos"] - v.pos).abs()
        near = loci[(loci["chrom"] == str(v.chrom)) & (distance <= window_kb * 1000)]
        loci.loc[near.index, "planted"] = True
        row = {"kind": "planted", "region": v.region, "planted_variant": v.id, "chrom": str(v.chrom), "pos": v.pos,
               "found": len(near) > 0, "phenotype": None, "lead_id": None, "distance_kb": np.nan, "p": np.nan}
        if len(near):
            lead = near.loc[near["p"].idxmin()]
            row.update(phenotype=lead["phenotype"], lead_id=lead["lead_id"],
                       distance_kb=abs(int(lead["lead_pos"]) - int(v.pos)) / 1000, p=lead["p"])
        rows.append(row)
    false = loci[~loci["planted"]].sort_values(["chrom", "lead_pos"])
    # One false signal seen by several phenotypes is one locus: chain leads closer than the window.
    new_locus = (false["chrom"] != false["chrom"].shift()) | (false["lead_pos"].diff() > window_kb * 1000)
    for _, group in false.groupby(new_locus.cumsum()):
        lead = group.loc[group["p"].idxmin()]
        rows.append({"kind": "false", "region": None, "planted_variant": None, "chrom": lead["chrom"],
                     "pos": int(lead["lead_pos"]), "found": None, "phenotype": lead["phenotype"],
                     "lead_id": lead["lead_id"], "distance_kb": np.nan, "p": lead["p"]})
    return pd.DataFrame(rows, columns=LOCI_COLUMNS[1:])


def strongest_near(gwas_dir: Path, planted: pd.DataFrame, window_kb: float) -> pd.DataFrame:
    """For each planted variant (columns chrom, pos; the frame's index kept): the phenotype and p of the
    smallest p of any phenotype within `window_kb` (best_phenotype, best_p) and the smallest p at the
    variant itself (p_at_variant), from the GWAS's results, in one query."""
    half = int(window_kb * 1000)
    rows = planted[["chrom", "pos"]].astype({"chrom": str}).rename_axis("row").reset_index()
    near = duckdb.sql(f"""
        SELECT v.row, arg_min(r.phenotype::VARCHAR, r.p) AS best_phenotype, min(r.p) AS best_p,
               min(r.p) FILTER (WHERE r.pos = v.pos) AS p_at_variant
        FROM rows v JOIN {results_sql(gwas_dir)} r
          ON r.chrom::VARCHAR = v.chrom AND r.pos BETWEEN v.pos - {half} AND v.pos + {half}
        WHERE r.p IS NOT NULL GROUP BY v.row""").df().set_index("row")
    return near.reindex(planted.index)


def validate_set(gwas_dir: str | Path, causal: pd.DataFrame, window_kb: float = 500.0) -> tuple[dict, pd.DataFrame]:
    """The summary (planted, found, false_loci, λGC, phenotypes, threshold) and the rows of one set's GWAS."""
    gwas_dir = Path(gwas_dir)
    try:
        summary = json.loads((gwas_dir / "summary.json").read_text())
        loci = pd.read_parquet(gwas_dir / "loci.parquet")
    except (OSError, ValueError) as e:
        raise InputError(gwas_dir, f"no finished GWAS here ({e}); run `endopheno gwas --out {gwas_dir}`") from None
    table = score_loci(loci[loci["study_wide"]], causal, window_kb)
    table[["best_phenotype", "best_p", "p_at_variant"]] = strongest_near(gwas_dir, table[table["kind"] == "planted"], window_kb)
    planted = table[table["kind"] == "planted"]
    return {"planted": len(planted), "found": int(planted["found"].sum()),
            "false_loci": int((table["kind"] == "false").sum()),
            "lambda_gc_median": summary["lambda_gc_median"], "phenotypes": len(summary["phenotypes"]),
            "study_wide_threshold": summary["thresholds"]["study-wide"]}, table


def validate(gwas_root: str | Path, feature_sets: list[str], causal_path: str | Path, out: str | Path,
             window_kb: float = 500.0) -> dict:
    """Validate every set's GWAS (``<gwas_root>/<set>``) and write into `out`: ``validation.json`` (the
    summaries), ``metrics.json`` (the same, flat, for `dvc metrics show`), ``loci.tsv`` (every planted and
    false locus) and ``plots/`` (each set's Manhattan and QQ plot, for `dvc plots show`). A set without a
    finished GWAS is reported, not fatal; the folder is replaced as a whole."""
    causal = read_causal(causal_path)
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "plots").mkdir(parents=True)
    summaries, tables, missing = {}, [], {}
    for name in feature_sets:
        try:
            summaries[name], table = validate_set(Path(gwas_root) / name, causal, window_kb)
        except InputError as e:
            missing[name] = str(e)
            continue
        tables.append(table.assign(feature_set=name))
        for plot in ("manhattan_all", "qq"):
            source = Path(gwas_root) / name / "plots" / f"{plot}.png"
            if source.exists():
                shutil.copy(source, partial / "plots" / f"{name}_{plot.removesuffix('_all')}.png")
    loci = pd.concat(tables, ignore_index=True)[LOCI_COLUMNS] if tables else pd.DataFrame(columns=LOCI_COLUMNS)
    loci.to_csv(partial / "loci.tsv", sep="\t", index=False, na_rep="NA")
    record = {"feature_sets": summaries, "missing": missing, "window_kb": window_kb, "causal": str(causal_path)}
    (partial / "validation.json").write_text(json.dumps(record, indent=1) + "\n")
    metrics = {name: {k: s[k] for k in ("found", "planted", "false_loci", "lambda_gc_median")}
               for name, s in summaries.items()}
    (partial / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    partial.replace(out)
    return record
