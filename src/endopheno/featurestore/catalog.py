"""The DuckDB catalog, `stores/catalog.duckdb`: SQL views over every store, for people who never open
Python.

DuckDB cannot load its delta extension offline, so a feature set's view reads the Parquet files of
one Delta snapshot (``read_parquet([...])``); every path in a view is relative to the repository
root, so the views work from the plain `duckdb` client started there and from any copy of the
repository (`endopheno sql` finds that root itself). Schemas:

- ``features``: ``<set>`` (latest version) and ``<set>_v<N>`` (every version, pinned).
- ``cohort``: ``participants`` (participants.tsv, with ``subject_id``; one row per subject, and
  ``participant_rows`` > 1 where its ID is duplicated), ``imaging_qc`` (qc.tsv, with ``subject_id`` and
  ``session``), ``joined_<set>`` (every row of a feature set with the first join it fails, `dropped_at`,
  and why), ``analysis_<set>`` (the analysis cohort: features ⨝ QC ⨝ participants with covariates ⨝
  genotyped samples ⨝ PCs, one session per individual), ``dropout_<set>``, and ``analysis``/``dropout``
  for `analysis_feature_set`.
- ``genotypes``: ``samples``, ``variants``, ``pcs``, ``removed_samples``, ``dosage_rows`` (one row per
  variant: ``id`` and ``dosages``, a list in sample order, NULL = missing call) and the table macros
  ``dosages(['id', ...])`` (long: id, iid, dosage) and ``dosages_all()``. A DuckDB view cannot read
  Zarr, so the catalog stage exports the dosage array to one Parquet file of lists (the phantom's
  90k × 400 calls: 8 MB, a few seconds); wide form is one ``PIVOT`` away (README).
- ``gwas``: ``results`` and ``hits`` of every run under the GWAS folder, with a ``run`` column.
- ``attribution``: ``latent_regions`` (every autoencoder's latent dimension → region shares, from
  ``endopheno attribute``) and ``scores`` (each model's attribution maps scored against a truth map).
- ``meta``: ``feature_sets``, ``feature_columns``, ``feature_versions`` (one row per version with its
  commit metadata), ``gwas_runs`` (from MLflow, with the feature-set version a run's phenotype file
  came from) and ``lineage`` (GWAS run → feature-set version → model version, MLflow run,
  volume-store digest, git revision), ``catalog`` (when and from where it was built).

The file is written beside its destination and renamed into place, so readers never see a half-built
catalog and a crash leaves the previous one.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from endopheno.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogParams:
    """The `catalog` section of params.yaml. Paths are relative to the repository root."""

    path: str = "stores/catalog.duckdb"
    features: str = "stores/features"
    definitions: str = "features"
    participants: str | None = "data/phantom/bids/participants.tsv"
    imaging_qc: str | None = "stores/qc/qc.tsv"
    genotypes: str | None = "stores/genotypes/phantom"
    gwas: str | None = "stores/gwas"
    exports: str = "stores/catalog"
    covariates: list = field(default_factory=lambda: ["age", "sex"])
    analysis_feature_set: str | None = "atlas_regions"
    tracking_uri: str | None = None
    attribution: str | None = "stores/attribution"


def q(path: str | Path) -> str:
    """A SQL string literal."""
    return "'" + str(path).replace("'", "''") + "'"


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def export_dosage_rows(store: Path, out: Path) -> Path:
    """Write the genotype store's dosage array as Parquet: one row per variant, `id` and `dosages`
    (int8 list in samples.parquet order, NULL for a missing call). Skipped when the export is newer
    than the store's digest file."""
    import zarr

    from endopheno.genotypes.store import StoreSource

    source = StoreSource(store)
    stamp = out.with_suffix(".digest")
    if out.exists() and stamp.exists() and stamp.read_text() == source.digest:
        return out
    arr = zarr.open_array(str(store / "dosages.zarr"), mode="r")
    tmp = out.with_name(out.name + ".tmp")
    chunk = arr.chunks[0]
    ids = source.variants["id"].astype(str).to_numpy()
    with pq.ParquetWriter(tmp, pa.schema([("id", pa.string()), ("dosages", pa.list_(pa.float32() if arr.dtype == np.float32 else pa.int8()))]),
                          compression="zstd") as w:
        for start in range(0, arr.shape[0], chunk):
            block = source.read(start, start + chunk)
            missing = np.isnan(block) if block.dtype.kind == "f" else block == -127
            flat = pa.array(block.ravel(), mask=missing.ravel())
            offsets = pa.array(np.arange(0, block.size + 1, block.shape[1], dtype=np.int32))
            w.write_table(pa.table({"id": ids[start:start + len(block)],
                                    "dosages": pa.ListArray.from_arrays(offsets, flat)}))
    os.replace(tmp, out)
    stamp.write_text(source.digest)
    return out


def _feature_views(con, p: CatalogParams, root: Path) -> dict[str, int]:
    from endopheno.featurestore.store import PROVENANCE, history, snapshot_files

    versions, rows = {}, []
    for table_dir in sorted(Path(root, p.features).glob("*/_delta_log")):
        name = table_dir.parent.name
        rel = Path(p.features) / name
        for h in history(root / rel):
            files = snapshot_files(root / rel, h["version"], relative_to=root)
            if files:
                con.execute(f"CREATE VIEW features.{ident(name + '_v' + str(h['version']))} AS "
                            f"SELECT * FROM read_parquet([{', '.join(map(q, files))}])")
            rows.append({"feature_set": name, **h})
            versions[name] = h["version"]
        con.execute(f"CREATE VIEW features.{ident(name)} AS SELECT * FROM features.{ident(name + '_v' + str(versions[name]))}")
    for r in rows:
        r["is_latest"] = r["version"] == versions[r["feature_set"]]
    types = {"feature_set": "VARCHAR", "version": "BIGINT", "timestamp": "TIMESTAMPTZ", "rows": "BIGINT",
             **dict.fromkeys(PROVENANCE, "VARCHAR"), "is_latest": "BOOLEAN"}
    con.execute(f"CREATE TABLE meta.feature_versions ({', '.join(f'{c} {t}' for c, t in types.items())})")
    if rows:
        cols = list(types)
        con.executemany(f"INSERT INTO meta.feature_versions VALUES ({', '.join('?' * len(cols))})",
                        [[r[c] for c in cols] for r in rows])
    return versions


def _definitions(con, p: CatalogParams, root: Path) -> None:
    from endopheno.featurestore.definitions import definitions

    sets, columns = [], []
    for name, d in definitions(root / p.definitions).items():
        sets.append([name, d.description, d.schema_version, str(d.producer.get("kind", "")), d.model_name,
                     d.model_version, str(Path(p.definitions) / f"{name}.yaml")])
        columns += [[name, c.name, c.type, c.description, c.per] for c in d.columns]
    con.execute("CREATE TABLE meta.feature_sets (feature_set VARCHAR, description VARCHAR, schema_version INTEGER, "
                "producer_kind VARCHAR, model_name VARCHAR, model_version VARCHAR, definition VARCHAR)")
    con.execute("CREATE TABLE meta.feature_columns (feature_set VARCHAR, column_name VARCHAR, type VARCHAR, "
                "description VARCHAR, per VARCHAR)")
    if sets:
        con.executemany("INSERT INTO meta.feature_sets VALUES (?, ?, ?, ?, ?, ?, ?)", sets)
    if columns:
        con.executemany("INSERT INTO meta.feature_columns VALUES (?, ?, ?, ?, ?)", columns)


def _participants_view(con, p: CatalogParams, root: Path, genotyped: bool) -> None:
    """cohort.participants: one row per subject; `participant_rows` counts the file's rows with its ID (the
    cohort join drops a duplicated subject: which row is right cannot be told)."""
    if not (root / p.participants).exists():
        raise InputError(p.participants, "participants table not found (catalog.participants in params.yaml)")
    source = f"read_csv({q(p.participants)}, delim='\t', header=true, nullstr='n/a')"
    have = column_names(con, f"SELECT * FROM {source}")
    # the covariates matter only to the cohort join, which needs the genotype store
    needed = ["participant_id", *(c for c in p.covariates if c not in IMAGING_COVARIATES and genotyped)]
    if missing := [c for c in needed if c not in have]:
        raise InputError(p.participants, f"no column {', '.join(missing)} (needed: participant_id and the covariates of "
                         f"catalog.covariates in params.yaml; the table has {', '.join(have)})")
    con.execute(f"CREATE VIEW cohort.participants AS SELECT regexp_replace(participant_id, '^sub-', '') AS subject_id, *, "
                f"count(*) OVER (PARTITION BY subject_id) AS participant_rows FROM {source} "
                f"QUALIFY row_number() OVER (PARTITION BY subject_id) = 1")


def _cohort_views(con, p: CatalogParams, root: Path, feature_sets: list[str], genotyped: bool) -> None:
    if p.participants:
        _participants_view(con, p, root, genotyped)
    if p.imaging_qc:
        if not (root / p.imaging_qc).exists():
            raise InputError(p.imaging_qc, "imaging QC table not found (catalog.imaging_qc in params.yaml; null for none)")
        # qc.tsv's `subject` is the MNI row label, "<subject>_ses-<session>" where sessions exist
        # (volumes.preprocess.split_row_label): split it so that the join is on (subject_id, session).
        con.execute(f"CREATE VIEW cohort.imaging_qc AS SELECT split_part(subject, '_ses-', 1) AS subject_id, "
                    f"nullif(split_part(subject, '_ses-', 2), '') AS session, qc_correlation, qc_pass, note, "
                    f"etiv_mm3 FROM read_csv({q(p.imaging_qc)}, delim='\t', header=true, "
                    f"types={{'subject': 'VARCHAR', 'note': 'VARCHAR', 'etiv_mm3': 'DOUBLE'}})")
    else:
        con.execute("CREATE VIEW cohort.imaging_qc AS SELECT NULL::VARCHAR AS subject_id, NULL::VARCHAR AS session, "
                    "NULL::DOUBLE AS qc_correlation, NULL::BOOLEAN AS qc_pass, NULL::VARCHAR AS note, "
                    "NULL::DOUBLE AS etiv_mm3 WHERE false")
    if not p.participants or not genotyped:
        return
    pc_cols = pc_columns(con)
    for name in feature_sets:
        con.execute(f"CREATE VIEW cohort.{ident('joined_' + name)} AS "
                    + joined_select(f"features.{ident(name)}", p.covariates, pc_cols))
        con.execute(f"CREATE VIEW cohort.{ident('analysis_' + name)} AS SELECT * EXCLUDE (dropped_at, reason) "
                    f"FROM cohort.{ident('joined_' + name)} WHERE dropped_at IS NULL")
        con.execute(f"CREATE VIEW cohort.{ident('dropout_' + name)} AS SELECT subject_id, session, dropped_at, reason "
                    f"FROM cohort.{ident('joined_' + name)} WHERE dropped_at IS NOT NULL")
    if p.analysis_feature_set in feature_sets:
        for kind in ("analysis", "dropout"):
            con.execute(f"CREATE VIEW cohort.{kind} AS SELECT * FROM cohort.{ident(kind + '_' + p.analysis_feature_set)}")


IMAGING_COVARIATES = ("etiv_mm3",)   # measured by preprocessing (volumes/qc.py), not in participants.tsv


def column_names(con, relation: str) -> list[str]:
    """The column names of a relation (a table, a view or a query)."""
    return [r[0] for r in con.execute(f"SELECT column_name FROM (DESCRIBE {relation})").fetchall()]


def pc_columns(con) -> str:
    """The genotype store's PC columns, as the select list of the cohort join."""
    names = column_names(con, "genotypes.samples")
    return ", ".join(f"s.{c}" for c in names if c.startswith("pc") and c[2:].isdigit())


def joined_select(features: str, covariates: list[str], pc_cols: str) -> str:
    """The cohort join of one feature relation (a set's latest view or a pinned ``<set>_v<N>``). A covariate
    is a participants column, or one of `IMAGING_COVARIATES` (from the imaging QC table).

    Imaging QC is joined on (subject_id, session), participants and genotypes on subject_id. The analysis
    cohort has one row per genotyped individual: of a subject's sessions that pass every join, the first
    by session label (a row without a session first) is kept and the others drop out at `sessions`."""
    source = {c: ("qc" if c in IMAGING_COVARIATES else "p") + f".{ident(c)}" for c in covariates}
    missing_covariate = " OR ".join(f"{source[c]} IS NULL" for c in covariates) or "false"
    covariate_names = ", ".join(f"CASE WHEN {source[c]} IS NULL THEN {q(c)} END" for c in covariates) or "''"
    # Joins in order; a subject's `dropped_at` is the first one it fails, so the counts per step
    # add up and the report says why each subject is missing from the analysis cohort.
    joined = f"""
        SELECT f.*, {', '.join(source[c] for c in covariates)}{', ' if covariates else ''}
               s.fid, s.iid{', ' + pc_cols if pc_cols else ''},
               CASE WHEN NOT coalesce(qc.qc_pass, false) THEN 'imaging_qc'
                    WHEN p.subject_id IS NULL OR p.participant_rows > 1 THEN 'participants'
                    WHEN {missing_covariate} THEN 'covariates'
                    WHEN s.iid IS NULL THEN 'genotypes' END AS dropped_at,
               CASE WHEN qc.subject_id IS NULL THEN 'no imaging QC record'
                    WHEN NOT coalesce(qc.qc_pass, false) THEN 'flagged by imaging QC: ' || coalesce(qc.note, 'low correlation with the template')
                    WHEN p.subject_id IS NULL THEN 'not in the participants table'
                    WHEN p.participant_rows > 1 THEN 'duplicated in the participants table (' || p.participant_rows || ' rows)'
                    WHEN {missing_covariate} THEN 'missing covariate(s): ' || concat_ws(', ', {covariate_names})
                    WHEN s.iid IS NULL AND r.iid IS NOT NULL THEN 'removed by genotype QC: ' || r.reason
                    WHEN s.iid IS NULL THEN 'not genotyped' END AS reason
        FROM {features} f
        LEFT JOIN cohort.imaging_qc qc ON qc.subject_id = f.subject_id AND qc.session IS NOT DISTINCT FROM f.session
        LEFT JOIN cohort.participants p ON p.subject_id = f.subject_id
        LEFT JOIN genotypes.samples s ON s.iid = f.subject_id
        LEFT JOIN genotypes.removed_samples r ON r.iid = f.subject_id"""
    later = "dropped_at IS NULL AND row_number() OVER w > 1"
    return f"""
        SELECT * REPLACE (CASE WHEN {later} THEN 'sessions' ELSE dropped_at END AS dropped_at,
                          CASE WHEN {later} THEN 'one session per individual: ' ||
                                   coalesce('ses-' || first_value(session) OVER w, 'the scan without a session') ||
                                   ' is analysed (the first by session label)' ELSE reason END AS reason)
        FROM ({joined})
        WINDOW w AS (PARTITION BY subject_id, dropped_at IS NULL ORDER BY session NULLS FIRST)"""


def _genotype_views(con, p: CatalogParams, root: Path, dosages: bool = True) -> bool:
    if not p.genotypes or not (root / p.genotypes / "samples.parquet").exists():
        return False
    g = Path(p.genotypes)
    con.execute(f"CREATE VIEW genotypes.samples AS SELECT * EXCLUDE (file_row_number), file_row_number + 1 AS sample_index "
                f"FROM read_parquet({q(g / 'samples.parquet')}, file_row_number=true)")
    con.execute(f"CREATE VIEW genotypes.variants AS SELECT * FROM read_parquet({q(g / 'variants.parquet')})")
    con.execute("CREATE VIEW genotypes.pcs AS SELECT fid, iid, COLUMNS('^pc[0-9]+$') FROM genotypes.samples")
    con.execute(f"CREATE VIEW genotypes.removed_samples AS SELECT * FROM read_parquet({q(g / 'removed_samples.parquet')})")
    if not dosages:
        return True
    exports = root / p.exports
    exports.mkdir(parents=True, exist_ok=True)
    rows = export_dosage_rows(root / g, exports / f"dosages_{g.name}.parquet").relative_to(root)
    con.execute(f"CREATE VIEW genotypes.dosage_rows AS SELECT * FROM read_parquet({q(rows)})")
    con.execute("CREATE MACRO genotypes.dosages(ids) AS TABLE SELECT d.id, s.iid, d.dosages[s.sample_index] AS dosage "
                "FROM genotypes.dosage_rows d CROSS JOIN genotypes.samples s WHERE list_contains(ids, d.id) "
                "ORDER BY d.id, s.sample_index")
    con.execute("CREATE MACRO genotypes.dosages_all() AS TABLE SELECT d.id, s.iid, d.dosages[s.sample_index] AS dosage "
                "FROM genotypes.dosage_rows d CROSS JOIN genotypes.samples s")
    return True


def _gwas_views(con, p: CatalogParams, root: Path) -> None:
    if not p.gwas:
        return
    base = Path(p.gwas)
    for name, pattern in (("results", "*/results/*.parquet"), ("hits", "*/hits.parquet")):
        if list((root / base).glob(pattern)):
            con.execute(f"CREATE VIEW gwas.{name} AS SELECT regexp_extract(filename, {q('([^/]+)/' + ('results/' if name == 'results' else '') + '[^/]+$')}, 1) AS run, "
                        f"* EXCLUDE (filename) FROM read_parquet({q(base / pattern)}, filename=true, union_by_name=true)")


def _gwas_runs(con, p: CatalogParams, root: Path) -> None:
    """meta.gwas_runs from MLflow, joined to the feature-set version of each run's phenotype file when
    that file was written by `endopheno cohort` (its `.lineage.json` sidecar has the same sha256)."""
    import json

    import pandas as pd

    cols = ["run_id", "out", "start_time", "status", "git_revision", "genotypes_digest", "pheno", "pheno_sha256",
            "feature_set", "feature_set_version"]
    runs = []
    db = (p.tracking_uri or "sqlite:///stores/mlflow.db").removeprefix("sqlite:///")
    if (root / db).exists():
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{(root / db).resolve()}")
        experiment = client.get_experiment_by_name("endopheno.gwas")
        for r in client.search_runs([experiment.experiment_id]) if experiment else []:
            pheno = r.data.params.get("pheno", "")
            sidecar = root / (pheno + ".lineage.json") if pheno else None
            link = json.loads(sidecar.read_text()) if sidecar and sidecar.exists() else {}
            same = link.get("pheno_sha256") == r.data.params.get("pheno_sha256")
            runs.append([r.info.run_id, r.data.tags.get("out"), pd.Timestamp(r.info.start_time, unit="ms", tz="UTC"),
                         r.info.status, r.data.tags.get("git_revision"), r.data.tags.get("genotypes_digest"), pheno,
                         r.data.params.get("pheno_sha256"), link.get("feature_set") if same else None,
                         link.get("version") if same else None])
    frame = pd.DataFrame(runs, columns=cols).astype({"feature_set_version": "Int64"})
    con.register("gwas_runs_frame", frame)
    con.execute("CREATE TABLE meta.gwas_runs AS SELECT * FROM gwas_runs_frame")
    con.unregister("gwas_runs_frame")
    con.execute("""CREATE VIEW meta.lineage AS
        SELECT g.run_id AS gwas_run_id, g.out AS gwas_out, g.genotypes_digest, g.git_revision AS gwas_git_revision,
               v.feature_set, v.version AS feature_set_version, v.model_name, v.model_version,
               v.mlflow_run_id AS feature_mlflow_run_id, v.volume_store_digest, v.git_revision AS feature_git_revision,
               v.params_hash, v.schema_version, v.timestamp AS feature_set_committed
        FROM meta.gwas_runs g
        FULL JOIN meta.feature_versions v ON v.feature_set = g.feature_set AND v.version = g.feature_set_version""")


def _attribution_views(con, p: CatalogParams, root: Path) -> None:
    """The files `endopheno attribute` wrote under ``<attribution>/<model>/`` (staging folders skipped)."""
    if not p.attribution:
        return
    base = Path(p.attribution)
    for name, pattern in (("latent_regions", "*/latent_regions.parquet"), ("scores", "*/scores.tsv")):
        files = [os.path.relpath(f, root) for f in sorted((root / base).glob(pattern)) if not f.parent.name.startswith(".")]
        if not files:
            continue
        read = (f"read_parquet([{', '.join(map(q, files))}], union_by_name=true)" if name == "latent_regions" else
                f"read_csv([{', '.join(map(q, files))}], delim='\t', header=true, union_by_name=true, filename=true)")
        model = "" if name == "latent_regions" else "regexp_extract(filename, '([^/]+)/scores.tsv$', 1) AS model, "
        con.execute(f"CREATE VIEW attribution.{name} AS SELECT {model}* {'EXCLUDE (filename) ' if model else ''}FROM {read}")


def _data_views(con, p: CatalogParams, root: Path, dosages: bool = True) -> tuple[dict[str, int], bool]:
    """The features, meta, genotypes and cohort schemas: what the catalog holds before any result."""
    # Views hold paths relative to the root and DuckDB binds them when they are created.
    con.execute(f"SET file_search_path = {q(root)}")
    for schema in ("features", "cohort", "genotypes", "gwas", "meta", "attribution"):
        con.execute(f"CREATE SCHEMA {schema}")
    versions = _feature_views(con, p, root)
    _definitions(con, p, root)
    genotyped = _genotype_views(con, p, root, dosages)
    _cohort_views(con, p, root, sorted(versions), genotyped)
    return versions, genotyped


def cohort_catalog(p: CatalogParams, root: str | Path = ".") -> duckdb.DuckDBPyConnection:
    """The catalog's feature, genotype and cohort views, built afresh in memory from the stores (no
    dosage export, no results). A GWAS reads its analysis cohort from here rather than from the
    catalog file: that file is built after the GWAS, so that it shows the GWAS's results too."""
    con = duckdb.connect()
    _data_views(con, p, Path(root).resolve(), dosages=False)
    return con


def build_catalog(p: CatalogParams, root: str | Path = ".") -> dict:
    """Rebuild the catalog from every store (paths in `p` relative to `root`). Returns a summary."""
    t0 = time.perf_counter()
    root = Path(root).resolve()
    out = root / p.path
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        # The released command-line client (duckdb-cli 1.5) reads storage formats up to 1.5's; the
        # Python package (2.x) would otherwise write one that client refuses.
        con = duckdb.connect(str(tmp), config={"storage_compatibility_version": "v1.5.0"})
        versions, genotyped = _data_views(con, p, root)
        _gwas_views(con, p, root)
        _gwas_runs(con, p, root)
        _attribution_views(con, p, root)
        con.execute("CREATE TABLE meta.catalog AS SELECT ? AS built, ? AS root", [dt.datetime.now(dt.timezone.utc),
                                                                                 os.path.relpath(root, out.parent)])
        con.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(p.path), "feature_sets": len(versions), "versions": sum(v + 1 for v in versions.values()),
            "genotypes": genotyped, "seconds": time.perf_counter() - t0}


def connect(path: str | Path) -> duckdb.DuckDBPyConnection:
    """Open the catalog read-only, resolving its views' relative paths against the repository root it
    was built for, wherever the caller's working directory is."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no catalog here (build it with `endopheno catalog`)")
    con = duckdb.connect(str(path), read_only=True)
    root = con.execute("SELECT root FROM meta.catalog").fetchone()[0]
    con.execute(f"SET file_search_path = {q(path.resolve().parent / root)}")
    return con


# Statement types a query may have: reads. DuckDB's parser decides, not a regular expression.
READ_TYPES = {"SELECT", "EXPLAIN", "PRAGMA"}
# EXPLAIN's own words (after any comments), before the statement it explains
EXPLAIN = re.compile(r"^(\s|/\*.*?\*/|--[^\n]*\n)*EXPLAIN\s*(\([^)]*\))?\s*(ANALY[SZ]E\b)?", re.IGNORECASE | re.DOTALL)


def check_read_only(sql: str) -> list:
    """Parse `sql` with DuckDB and refuse any statement that is not a read (INSERT, UPDATE, DELETE,
    CREATE, DROP, ALTER, ATTACH, COPY, SET, LOAD, EXPORT, CALL …). Returns the statements."""
    from endopheno.errors import EndophenoError

    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise EndophenoError(str(e).splitlines()[0]) from None
    if not statements:
        raise EndophenoError("sql: no statement given")
    for s in statements:
        kind = s.type.name
        # A PIVOT without an IN list parses as MULTI (DuckDB first collects the pivot's column names);
        # it only reads. Writes inside one would still fail: the catalog is opened read-only.
        if kind == "MULTI" and s.query.lstrip().upper().startswith("PIVOT"):
            continue
        if kind == "EXPLAIN":
            # EXPLAIN ANALYZE runs the statement it explains (EXPLAIN ANALYZE COPY ... TO writes the
            # file): that statement must pass the same check.
            explained = EXPLAIN.sub("", s.query, count=1)
            if explained != s.query:
                check_read_only(explained)
                continue
        if kind not in READ_TYPES or kind == "EXPLAIN" or (kind == "PRAGMA" and "=" in s.query):
            raise EndophenoError(f"sql: refused a {kind} statement: the catalog is for reading; only SELECT, WITH, "
                                 f"SHOW, DESCRIBE, SUMMARIZE, EXPLAIN and PRAGMA queries run")
    return statements


def as_of_views(con: duckdb.DuckDBPyConnection, as_of: str) -> dict[str, int]:
    """Create a temporary view `<set>` (unqualified) per feature set at `as_of`: a version number or a
    timestamp. Returns the version chosen per set."""
    chosen = {}
    rows = con.execute("SELECT feature_set, version, epoch_ms(timestamp) FROM meta.feature_versions "
                       "ORDER BY feature_set, version").fetchall()
    if as_of.isdigit():
        pick = {s: v for s, v, _ in rows if v == int(as_of)}
    else:
        try:
            when = dt.datetime.fromisoformat(as_of)
        except ValueError:
            raise InputError(f"--as-of {as_of}", "neither a version number nor an ISO 8601 timestamp") from None
        when = when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)
        pick = {}
        for s, v, t in rows:
            if t <= when.timestamp() * 1000:
                pick[s] = v
    if not pick:
        raise InputError(f"--as-of {as_of}", "no feature-set version existed then")
    for s, v in pick.items():
        con.execute(f"CREATE TEMP VIEW {ident(s)} AS SELECT * FROM features.{ident(s + '_v' + str(v))}")
        chosen[s] = v
    return chosen


def query(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """Run read-only `sql` (several statements: the last one's result) and return an Arrow table. A
    bad query raises an `EndophenoError` with DuckDB's own first line."""
    from endopheno.errors import EndophenoError

    statements = check_read_only(sql)
    try:
        for s in statements[:-1]:
            con.execute(s)
        return con.sql(statements[-1].query).to_arrow_table()
    except duckdb.Error as e:
        raise EndophenoError(str(e).splitlines()[0]) from None
