"""After the scan: λGC, hits at the genome-wide and study-wide thresholds, independent loci, lead-variant
models, plots, ``OUT/summary.json`` — and the MLflow run that records it all."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import duckdb
import pandas as pd

from endopheno.gwas import results
from endopheno.gwas.results import ClumpParams

log = logging.getLogger(__name__)


@dataclass
class StudySettings:
    genome_wide: float = 5e-8       # the study-wide threshold is genome_wide / number of phenotypes tested
    clump: ClumpParams = field(default_factory=ClumpParams)
    manhattans: int = 12            # per-phenotype Manhattan plots, for the phenotypes with the strongest hits
    top_hits: int = 100             # rows of the top-hits table logged to MLflow


def analyse(out: str | Path, source, phenotypes, covariates, settings: StudySettings | None = None,
            left_out: dict[str, str] | None = None) -> dict:
    """Write summary.json, hits.parquet, loci.parquet, leads.parquet and plots/ into `out`. `left_out`:
    phenotypes screened out before the scan (name -> reason), recorded in the summary with those the scan
    itself could not test (its scan.json's `left_out`)."""
    settings = settings or StudySettings()
    out = Path(out)
    scanned = json.loads((out / "scan.json").read_text()) if (out / "scan.json").exists() else {}
    left_out = {**(left_out or {}), **scanned.get("left_out", {})}
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    # Bonferroni over the phenotypes tested: one the scan left out (too few samples for its model) is no test
    tested = [name for name in phenotypes.names if name not in left_out]
    study_wide = settings.genome_wide / max(1, len(tested))
    thresholds = {"genome-wide": settings.genome_wide, "study-wide": study_wide}

    lambdas = results.lambda_gc(out)
    hits = results.hits(out, settings.genome_wide)
    hits["study_wide"] = hits["p"] < study_wide
    hits.to_parquet(out / "hits.parquet", index=False)
    clump = ClumpParams(**{**asdict(settings.clump), "p1": settings.clump.p1 or settings.genome_wide})
    loci = results.clump(out, source, clump)
    loci["study_wide"] = loci["p"] < study_wide
    loci.to_parquet(out / "loci.parquet", index=False)
    leads = results.lead_models(loci, source, phenotypes, covariates)
    leads.to_parquet(out / "leads.parquet", index=False)

    results.qq(out, plots / "qq.png", lambdas)
    combined = duckdb.sql(f"""SELECT chrom::VARCHAR AS chrom, pos, max(log10_p) AS log10_p
                              FROM {results.results_sql(out)} WHERE reason IS NULL GROUP BY ALL""").df()
    results.manhattan(combined, plots / "manhattan_all.png",
                      f"all {len(tested)} phenotypes tested (strongest per variant)", thresholds)
    strongest = hits.groupby("phenotype")["log10_p"].max().sort_values(ascending=False)
    chosen = list(strongest.index[: settings.manhattans]) or lambdas["phenotype"].head(1).tolist()
    files = file_names(chosen)
    for name in chosen:
        # A parameter, not a quoted string: a phenotype name may hold a quote.
        table = duckdb.execute(f"""SELECT chrom::VARCHAR AS chrom, pos, log10_p FROM {results.results_sql(out)}
                                   WHERE reason IS NULL AND phenotype = ?""", [name]).df()
        results.manhattan(table, plots / f"manhattan_{files[name]}.png", name, thresholds)

    per_phenotype = lambdas.merge(hits.groupby("phenotype").size().rename("hits").reset_index(), how="left")
    per_phenotype = per_phenotype.merge(loci.groupby("phenotype").size().rename("loci").reset_index(), how="left")
    per_phenotype = per_phenotype.fillna({"hits": 0, "loci": 0}).astype({"hits": int, "loci": int})
    summary = {
        "thresholds": thresholds, "clump": asdict(clump),
        "phenotypes": per_phenotype.to_dict(orient="records"), "phenotypes_left_out": left_out,
        "lambda_gc_median": float(lambdas["lambda_gc"].median()) if len(lambdas) else None,
        "hits_genome_wide": int(len(hits)), "hits_study_wide": int(hits["study_wide"].sum()),
        "loci": int(len(loci)), "loci_study_wide": int(loci["study_wide"].sum()),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def file_names(names: list[str]) -> dict[str, str]:
    """A name usable in a file name (or an MLflow key) for each phenotype name — '/', quotes and the like
    become '_' — kept distinct where two names would otherwise meet ('gm/wm' and 'gm_wm')."""
    out: dict[str, str] = {}
    for name in names:
        base = candidate = re.sub(r"[^\w.-]", "_", name)
        suffix = 1
        while candidate in out.values():
            suffix += 1
            candidate = f"{base}_{suffix}"
        out[name] = candidate
    return out


def track(out: str | Path, summary: dict, scan: dict, inputs: dict, *, uri: str | None = None,
          settings: StudySettings | None = None) -> str:
    """Record the run in MLflow: inputs and options as params, λGC and hit counts as metrics, the
    top-hits table, loci, summary and plots as artifacts. Returns the run id."""
    import mlflow

    settings = settings or StudySettings()
    out = Path(out)
    with _mlflow_run(out, inputs, uri) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in {**inputs, **scan.get("options", {})}.items()})
        metrics = {"lambda_gc_median": summary["lambda_gc_median"], "hits_genome_wide": summary["hits_genome_wide"],
                   "hits_study_wide": summary["hits_study_wide"], "loci": summary["loci"],
                   "tests": scan["tests"], "tests_per_second": scan["tests"] / max(scan["seconds"], 1e-9)}
        keys = file_names([row["phenotype"] for row in summary["phenotypes"]])
        metrics.update({f"lambda_gc.{keys[row['phenotype']]}": row["lambda_gc"] for row in summary["phenotypes"]})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
        top = pd.read_parquet(out / "hits.parquet").head(settings.top_hits)
        mlflow.log_table(top.astype({c: str for c in ("chrom", "id", "a1", "a2")}), "top_hits.json")
        for name in ("summary.json", "scan.json", "loci.parquet", "leads.parquet"):
            mlflow.log_artifact(str(out / name))
        mlflow.log_artifacts(str(out / "plots"), "plots")
        return run.info.run_id


def _mlflow_run(out: Path, inputs: dict, uri: str | None):
    from endopheno.tracking import mlflow_run

    return mlflow_run("endopheno.gwas", f"gwas {out.name}", uri=uri, tags={"endopheno.kind": "gwas",
                      "genotypes_digest": inputs.get("genotypes_digest", ""), "out": str(out)})
