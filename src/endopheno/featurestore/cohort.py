"""The analysis cohort: features ⨝ imaging QC ⨝ participants (covariates) ⨝ genotyped samples ⨝ PCs,
as defined in SQL by the catalog (`cohort.joined_<set>`), with a report of who dropped out at each
join and why, and an export of the cohort as PLINK-style phenotype and covariate tables that
`endopheno gwas` reads. The export's `.lineage.json` sidecars tie a GWAS run (whose MLflow record has
the phenotype file's sha256) to the feature-set version it came from.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import duckdb

from endopheno.errors import InputError
from endopheno.featurestore.catalog import ident

STEPS = ("imaging_qc", "participants", "covariates", "genotypes", "sessions")   # sessions: one per individual


@dataclass
class CohortReport:
    feature_set: str
    version: int
    subjects: int                           # rows of the feature set (a row per session)
    kept: int
    dropped: dict[str, list[tuple[str, str]]]   # step -> [(subject_id[_ses-<session>], reason)]

    def summary(self) -> str:
        steps = ", ".join(f"{len(self.dropped.get(s, []))} at {s}" for s in STEPS)
        return (f"cohort {self.feature_set} v{self.version}: {self.subjects} subjects with features, "
                f"{self.kept} in the analysis cohort; dropped {steps}")


def _check_set(con: duckdb.DuckDBPyConnection, feature_set: str) -> int:
    found = con.execute("SELECT max(version) FROM meta.feature_versions WHERE feature_set = ?", [feature_set]).fetchone()[0]
    if found is None:
        raise InputError(feature_set, "no such feature set in the catalog (rebuild it with `endopheno catalog`?)")
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE schema_name = 'cohort'").fetchall()}
    if f"joined_{feature_set}" not in views:
        raise InputError(feature_set, "the catalog has no cohort join for it (no participants table or genotype store)")
    return found


def report(con: duckdb.DuckDBPyConnection, feature_set: str) -> CohortReport:
    """Who of the feature set's subjects reaches the analysis cohort, and who drops out where and why."""
    version = _check_set(con, feature_set)
    rows = con.execute(f"SELECT subject_id || coalesce('_ses-' || session, ''), dropped_at, reason "
                       f"FROM cohort.{ident('joined_' + feature_set)} ORDER BY subject_id, session NULLS FIRST").fetchall()
    dropped: dict[str, list] = {}
    for subject, step, reason in rows:
        if step is not None:
            dropped.setdefault(step, []).append((subject, reason))
    return CohortReport(feature_set, version, len(rows), sum(1 for r in rows if r[1] is None), dropped)


def export(con: duckdb.DuckDBPyConnection, feature_set: str, out: str | Path, covariates: list[str],
           version: int | None = None) -> dict[str, Path]:
    """Write the analysis cohort of the set's latest version (or of `version`) as `pheno.tsv` (FID,
    IID, every feature column) and `covar.tsv` (FID, IID, covariates, PCs), each with a
    `.lineage.json` naming the feature-set version and the file's sha256. Files are written beside
    their destination and renamed into place."""
    from endopheno.featurestore.catalog import joined_select, pc_columns
    from endopheno.featurestore.definitions import STANDARD_COLUMNS
    from endopheno.genotypes.store import file_sha256

    latest = _check_set(con, feature_set)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if version is None or version == latest:
        version, features_view = latest, f"features.{ident(feature_set)}"
        view = f"cohort.{ident('analysis_' + feature_set)}"
    else:
        features_view = f"features.{ident(f'{feature_set}_v{version}')}"
        known = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE schema_name = 'features'").fetchall()}
        if features_view.split(".", 1)[1].strip('"') not in known:
            raise InputError(f"{feature_set}@{version}", f"no such version (latest is {latest})")
        view = f"({joined_select(features_view, covariates, pc_columns(con))}) WHERE dropped_at IS NULL"
        view = f"(SELECT * EXCLUDE (dropped_at, reason) FROM {view})"
    features = [c for c in con.sql(f"SELECT * FROM {features_view} LIMIT 0").to_arrow_table().schema.names
                if c not in STANDARD_COLUMNS]
    pcs = [c for c in con.sql(f"SELECT * FROM {view} LIMIT 0").to_arrow_table().schema.names
           if c.startswith("pc") and c[2:].isdigit()]
    tables = {"pheno.tsv": features, "covar.tsv": [*covariates, *pcs]}
    written = {}
    for name, columns in tables.items():
        path, tmp = out / name, out / f".{name}.tmp"
        select = ", ".join(["fid AS FID", "iid AS IID", *map(ident, columns)])
        con.execute(f"COPY (SELECT {select} FROM {view} ORDER BY iid) TO '{tmp}' (DELIMITER '\t', HEADER, NULLSTR 'NA')")
        os.replace(tmp, path)
        Path(f"{path}.lineage.json").write_text(json.dumps(
            {"feature_set": feature_set, "version": version, "pheno_sha256": file_sha256(path), "columns": columns},
            indent=2) + "\n")
        written[name] = path
    return written
