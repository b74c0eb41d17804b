"""The `endopheno` command: a thin layer over the library. A user's mistake prints one line and exits 2;
a run that finished but rejected some inputs exits 1 after its summary."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.logging import RichHandler

from endopheno.errors import EndophenoError, InputError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="endopheno: a versioned feature store for imaging genetics.")
err = Console(stderr=True, highlight=False)

WORKERS = typer.Option(None, help="Parallel worker processes (default: one per core).")
SCHEDULER = typer.Option(None, help="Address of an existing dask scheduler (e.g. tcp://host:8786) to run on.")
DIGEST_FILE = typer.Option(None, help="Also write the group's content digest (JSON) here: a small file for DVC stages to depend on.")
BFILE = typer.Option(None, help="PLINK 1 prefix: PREFIX.bed/.bim/.fam.")
PFILE = typer.Option(None, help="PLINK 2 prefix: PREFIX.pgen/.pvar/.psam.")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False, show_time=False)], force=True)
    for noisy in ("msprime", "distributed", "numcodecs", "matplotlib", "asyncio", "tornado", "bed_reader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debugging detail.")) -> None:
    _setup_logging(verbose)


@app.command()
def phantom(
    out: Path = typer.Option(..., help="Folder to write the cohort into (replaced if it exists)."),
    subjects: Optional[int] = typer.Option(None, help="Number of imaged subjects (default: params.yaml)."),
    seed: Optional[int] = typer.Option(None, help="Random seed (default: params.yaml)."),
    second_population: Optional[float] = typer.Option(None, help="Share of subjects from a second ancestral population."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameter file; its `phantom` section is used."),
    workers: Optional[int] = WORKERS,
) -> None:
    """Generate the phantom cohort: BIDS T1w images, PLINK genotypes and the ground truth."""
    from endopheno.params import load_params
    from endopheno.phantom import generate

    t0 = time.perf_counter()
    p = load_params("phantom", params)
    if second_population is not None:
        p["genetics"]["second_population_fraction"] = second_population
    summary = generate(out, p, subjects=subjects, seed=seed, workers=workers)
    err.print(f"phantom: {summary['subjects']} subjects ({summary['AD']} AD), {summary['variants']} variants, "
              f"{summary['causal']} causal, written to {summary['out']} in {time.perf_counter() - t0:.1f} s")


@app.command()
def ingest(
    store: Path = typer.Option(..., help="Volume store (Zarr) to create or update."),
    bids: Optional[Path] = typer.Option(None, help="BIDS dataset to ingest."),
    manifest: Optional[Path] = typer.Option(None, help="CSV with subject_id,path[,session,modality]."),
    allow_rejected: bool = typer.Option(False, help="Exit 0 even when some files were rejected."),
    digest_file: Optional[Path] = DIGEST_FILE,
    workers: Optional[int] = WORKERS,
    scheduler: Optional[str] = SCHEDULER,
) -> None:
    """Validate NIfTI files and store them losslessly in the volume store (incremental)."""
    from endopheno.volumes.ingest import ingest as run, inputs_from_bids, inputs_from_manifest
    from endopheno.volumes.store import NATIVE, native_digest, write_digest_file

    if (bids is None) == (manifest is None):
        raise EndophenoError("ingest: give exactly one of --bids DIR or --manifest FILE.csv")
    t0 = time.perf_counter()
    inputs, rejected = inputs_from_bids(bids) if bids else inputs_from_manifest(manifest)
    report = run(inputs, store, rejected=rejected, workers=workers, scheduler=scheduler)
    for what, reason in report.rejected:
        err.print(f"[red]rejected[/red] {what}: {reason}", soft_wrap=True)
    seconds = time.perf_counter() - t0
    err.print(f"{report.summary()} in {seconds:.1f} s ({len(report.ingested) / seconds:.1f} volumes/s)")
    if digest_file:
        write_digest_file(digest_file, NATIVE, *native_digest(store))
    if report.rejected and not allow_rejected:
        raise typer.Exit(1)


@app.command()
def preprocess(
    store: Path = typer.Option(..., help="Volume store holding ingested native volumes."),
    qc_dir: Optional[Path] = typer.Option(None, help="Where to write qc.tsv and montage.png (default: beside the store, in qc/)."),
    voxel_size: Optional[float] = typer.Option(None, help="Output voxel size in mm (default: params.yaml or 2)."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameter file; its `preprocess` section is used if present."),
    digest_file: Optional[Path] = DIGEST_FILE,
    workers: Optional[int] = WORKERS,
    scheduler: Optional[str] = SCHEDULER,
) -> None:
    """Bring every native volume into MNI space: reorient, N4, affine registration, resample, mask, normalise;
    then the log-Jacobian maps of a non-linear registration to the template (tensor-based morphometry)."""
    from endopheno.params import from_section, load_section
    from endopheno.volumes.morphometry import MorphometryParams, morphometry
    from endopheno.volumes.preprocess import PreprocessParams, mni_digest, open_mni, preprocess as run
    from endopheno.volumes.qc import montage, qc_table
    from endopheno.volumes.store import MNI, write_digest_file

    section = load_section("preprocess", params)
    p = PreprocessParams.from_dict({**section, **({"voxel_size_mm": voxel_size} if voxel_size else {})})
    t0 = time.perf_counter()
    report = run(store, p, workers=workers, scheduler=scheduler)
    seconds = time.perf_counter() - t0
    if section.get("morphometry", {}) is not None:  # null in params.yaml: no log-Jacobian maps
        m = from_section(MorphometryParams, {"modality": p.modality, **section.get("morphometry", {})}, "preprocess.morphometry")
        t1 = time.perf_counter()
        rows = morphometry(store, m, workers=workers, scheduler=scheduler)
        err.print(f"morphometry: {len(rows)} log-Jacobian maps in {time.perf_counter() - t1:.1f} s")
    for subject, reason in report.failed:
        err.print(f"[red]failed[/red] subject {subject}: {reason}", soft_wrap=True)
    for subject, corr in report.qc_failed:
        err.print(f"[yellow]flagged[/yellow] subject {subject}: correlation with template {corr:.3f} < {p.qc_min_correlation}")
    qc_dir = qc_dir or store.parent / "qc"
    qc_dir.mkdir(parents=True, exist_ok=True)
    ds = open_mni(store)
    qc_table(ds).to_csv(qc_dir / "qc.tsv", sep="\t", index=False)
    montage(ds, qc_dir / "montage.png", p.modality)
    if digest_file:
        write_digest_file(digest_file, MNI, *mni_digest(ds))
    err.print(f"{report.summary()} in {seconds:.1f} s ({60 * len(report.processed) / seconds:.1f} subjects/min); QC in {qc_dir}")
    if report.failed:
        raise typer.Exit(1)


genotypes_app = typer.Typer(no_args_is_help=True, help="The genotype store: PLINK files in; QC'd dosages, tables and PCs out.")
app.add_typer(genotypes_app, name="genotypes")


@genotypes_app.command("import")
def genotypes_import(
    out: Path = typer.Option(..., help="Genotype store folder to write, e.g. stores/genotypes/<name> (replaced whole)."),
    bfile: Optional[Path] = BFILE,
    pfile: Optional[Path] = PFILE,
    subjects: Optional[Path] = typer.Option(None, help="Imaging subjects to match sample IIDs against: the volume store or a participants.tsv."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameter file; its `genotypes` section (QC, PCA, chunking, seed) is used if present."),
    workers: Optional[int] = typer.Option(None, help="Threads computing the PCs (default: one per core)."),
    scheduler: Optional[str] = SCHEDULER,
) -> None:
    """Import PLINK genotypes: sample and variant QC, Zarr dosages, Parquet tables, genetic PCs."""
    if (bfile is None) == (pfile is None):
        raise EndophenoError("genotypes import: give exactly one of --bfile PREFIX or --pfile PREFIX")
    from endopheno.genotypes.ids import imaging_subjects
    from endopheno.genotypes.importer import ImportParams, import_genotypes
    from endopheno.genotypes.sources import open_source
    from endopheno.params import load_section

    p = ImportParams.from_dict(load_section("genotypes", params))
    t0 = time.perf_counter()
    source = open_source(bfile=bfile, pfile=pfile)
    ids = imaging_subjects(subjects) if subjects else None
    report = import_genotypes(source, out, p, subjects=ids, subjects_from=str(subjects) if subjects else None,
                              workers=workers, scheduler=scheduler)
    err.print(f"{report.summary()} in {time.perf_counter() - t0:.1f} s", soft_wrap=True)


@app.command()
def gwas(
    out: Path = typer.Option(..., help="Output folder: results/ (Parquet), hits, loci, plots, summary.json."),
    pheno: Optional[Path] = typer.Option(None, help="Phenotype table (PLINK 2 style: header, [FID] IID, NA = missing)."),
    feature_set: Optional[str] = typer.Option(None, help="Instead of --pheno: a feature set NAME[@VERSION] of the catalog; "
                                              "its analysis cohort gives the phenotypes, covariates and PCs."),
    bfile: Optional[Path] = BFILE,
    pfile: Optional[Path] = PFILE,
    genotypes: Optional[Path] = typer.Option(None, help="Genotype store folder (from `endopheno genotypes import`)."),
    pheno_name: Optional[str] = typer.Option(None, help="Comma-separated phenotype columns (default: all)."),
    covar: Optional[Path] = typer.Option(None, help="Covariate table, same conventions as --pheno."),
    covar_name: Optional[str] = typer.Option(None, help="Comma-separated covariate columns (default: all)."),
    pcs: int = typer.Option(0, help="Add the genotype store's first N genetic PCs as covariates."),
    missing: Optional[str] = typer.Option(None, help="Missing genotype calls: exact (drop the sample, as PLINK 2) | mean."),
    precision: Optional[str] = typer.Option(None, help="float64 | float32 (the big product only)."),
    min_maf: Optional[float] = typer.Option(None, help="Skip variants below this minor allele frequency."),
    min_mac: Optional[float] = typer.Option(None, help="Skip variants below this minor allele count."),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | auto: where the big product runs."),
    block_variants: Optional[int] = typer.Option(None, help="Variants per block (memory ∝ block × samples)."),
    transform: Optional[str] = typer.Option(None, help="Phenotype transform: none | inverse_normal (rank-based)."),
    mlflow: bool = typer.Option(True, help="Record the run in MLflow."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: sqlite:///stores/mlflow.db)."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameter file; its `gwas` section gives the defaults."),
    workers: Optional[int] = WORKERS,
    scheduler: Optional[str] = SCHEDULER,
) -> None:
    """Test every phenotype against every variant (linear regression with covariates, exact like plink2 --glm)."""
    from endopheno.genotypes.sources import open_source
    from endopheno.gwas.phenotypes import Aligned, align, inverse_normal, read_table, screen
    from endopheno.gwas.results import ClumpParams
    from endopheno.gwas.run import GwasOptions, scan
    from endopheno.gwas.study import StudySettings, analyse, track
    from endopheno.genotypes.store import file_sha256
    from endopheno.params import from_section, load_section

    section = dict(load_section("gwas", params))
    given = {"missing": missing, "precision": precision, "min_maf": min_maf, "min_mac": min_mac, "device": device,
             "block_variants": block_variants, "workers": workers, "scheduler": scheduler}
    options = from_section(GwasOptions, {**section, **{k: v for k, v in given.items() if v is not None}}, "gwas",
                           ignore={"genome_wide", "clump", "tracking_uri", "feature_sets", "out", "transform",
                                   "max_tied_fraction"})
    if not isinstance(options.block_variants, int) or options.block_variants < 1:   # a range() step would traceback
        raise EndophenoError(f"gwas: block_variants must be at least 1, not {options.block_variants}")
    transform = transform or section.get("transform") or "none"
    if transform not in ("none", "inverse_normal"):
        raise EndophenoError(f"gwas: transform must be none or inverse_normal, not {transform!r}")
    settings = StudySettings(genome_wide=section.get("genome_wide", 5e-8), clump=ClumpParams(**section.get("clump", {})))
    if (pheno is None) == (feature_set is None):
        raise EndophenoError("gwas: give exactly one of --pheno FILE or --feature-set NAME[@VERSION]")
    lineage = {}
    if feature_set:
        pheno, covar, lineage, store = _feature_set_cohort(feature_set, out / "cohort", params, covar)
        if bfile is None and pfile is None and genotypes is None:
            genotypes = store
    source = open_source(bfile=bfile, pfile=pfile, store=genotypes)
    split = (lambda names: [n.strip() for n in names.split(",") if n.strip()] if names else None)
    covariates = align(read_table(covar, split(covar_name), kind="covariate"), source.samples) if covar else None
    if pcs:
        columns = [f"pc{i}" for i in range(1, pcs + 1)]
        if not set(columns) <= set(source.samples.columns):
            raise EndophenoError(f"gwas: --pcs {pcs} needs a genotype store with at least {pcs} PCs (--genotypes)")
        pc_values = source.samples[columns].to_numpy(dtype=float)
        covariates = Aligned(pc_values, columns) if covariates is None else Aligned(
            np.hstack([covariates.values, pc_values]), covariates.names + columns, covariates.unmatched, covariates.source)
    phenotypes = align(read_table(pheno, split(pheno_name)), source.samples)
    for what, table in (("phenotype", phenotypes), ("covariate", covariates)):
        if table is not None and table.unmatched:
            err.print(f"[yellow]{len(table.unmatched)} {what} rows match no genotyped sample[/yellow] "
                      f"(first: {', '.join(table.unmatched[:5])}); they are not used", soft_wrap=True)
    without = int(np.isnan(phenotypes.values).all(axis=1).sum())
    if without:
        err.print(f"{without} of {len(source.samples)} genotyped samples have no phenotype value")
    phenotypes, left_out = screen(phenotypes, section.get("max_tied_fraction", 0.5), covariates)
    if left_out:
        err.print(f"[yellow]{len(left_out)} phenotypes not tested[/yellow] (first: "
                  + "; ".join(f"{k}: {v}" for k, v in list(left_out.items())[:3]) + ")", soft_wrap=True)
    if not phenotypes.names:
        raise EndophenoError(f"gwas: no phenotype of {pheno} is fit to test (see above)")
    if transform == "inverse_normal":
        phenotypes = inverse_normal(phenotypes)

    summary = scan(source, phenotypes, covariates, out, options)
    study = analyse(out, source, phenotypes, covariates, settings, left_out=left_out)
    run_id = None
    if mlflow:
        inputs = {"genotypes": str(source.path), "genotypes_digest": getattr(source, "digest", ""),
                  "pheno": str(pheno), "pheno_sha256": file_sha256(pheno), "phenotypes": len(phenotypes.names),
                  "covariates": ",".join(covariates.names) if covariates else "", "transform": transform,
                  "phenotypes_left_out": len(left_out), **lineage}
        scan_record = json.loads((out / "scan.json").read_text())
        run_id = track(out, study, scan_record, inputs, uri=tracking_uri or section.get("tracking_uri"), settings=settings)
    untested = sum(summary.untested.values())
    err.print(f"gwas: {len(phenotypes.names)} phenotypes × {summary.variants} variants: {summary.tests} tests in "
              f"{summary.seconds:.1f} s ({summary.tests_per_second:,.0f}/s)"
              + (f", {untested} untestable ({', '.join(summary.untested)})" if untested else "")
              + (f"; λGC median {study['lambda_gc_median']:.3f}" if study["lambda_gc_median"] is not None else "")
              + f"; {study['hits_genome_wide']} genome-wide hits in "
              f"{study['loci']} loci ({study['loci_study_wide']} study-wide); results in {out}"
              + (f"; MLflow run {run_id}" if run_id else ""), soft_wrap=True)


@app.command()
def validate(
    out: Optional[Path] = typer.Option(None, help="Output folder (default: params.yaml validate.out)."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameter file; its `validate` section is used."),
) -> None:
    """Score each feature set's GWAS against the planted causal variants (the phantom's truth): planted loci
    found at the study-wide threshold, loci found that were not planted, λGC."""
    import pyarrow as pa

    from endopheno.params import from_section, load_params
    from endopheno.validation import ValidateParams, validate as validate_chain

    p = from_section(ValidateParams, load_params("validate", params), "validate")
    if not p.causal or not p.feature_sets:
        raise EndophenoError("validate: params.yaml validate needs causal (the planted variants) and feature_sets")
    record = validate_chain(p.gwas, p.feature_sets, p.causal, out or p.out, p.window_kb)
    rows = [{"feature set": name, "planted loci found": f"{s['found']} of {s['planted']}", "false loci": s["false_loci"],
             "λGC (median)": "" if s["lambda_gc_median"] is None else f"{s['lambda_gc_median']:.3f}", "phenotypes": s["phenotypes"],
             "study-wide p": f"{s['study_wide_threshold']:.1e}"} for name, s in record["feature_sets"].items()]
    if rows:
        _print_table(pa.Table.from_pylist(rows), "the chain against the planted truth")
    for name, reason in record["missing"].items():
        err.print(f"[yellow]validate: {name}: {reason}[/yellow]", soft_wrap=True)
    err.print(f"validate: {len(rows)} feature sets scored, written to {out or p.out}")


features_app = typer.Typer(no_args_is_help=True, help="Feature sets: definitions in features/, versions in stores/features/.")
app.add_typer(features_app, name="features")
PARAMS = typer.Option(Path("params.yaml"), help="Parameter file; its `features` and `catalog` sections are used.")
CATALOG = typer.Option(None, help="Catalog file (default: params.yaml catalog.path, stores/catalog.duckdb).")


def _feature_params(params: Path):
    from endopheno.featurestore.atlas import FeatureParams
    from endopheno.params import from_section, load_section

    return from_section(FeatureParams, load_section("features", params), "features")


def _catalog_params(params: Path):
    from endopheno.featurestore.catalog import CatalogParams
    from endopheno.params import from_section, load_section

    return from_section(CatalogParams, load_section("catalog", params), "catalog")


def _print_table(table, title: str | None = None) -> None:
    from rich.table import Table

    out = Table(title=title, show_lines=False)
    for name in table.column_names:
        out.add_column(name, overflow="fold")
    for row in table.to_pylist():
        out.add_row(*("" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v) for v in row.values()))
    Console(highlight=False).print(out)


@features_app.command("list")
def features_list(params: Path = PARAMS) -> None:
    """Every feature set defined in features/, with its latest version."""
    import pyarrow as pa

    from endopheno.featurestore.definitions import definitions
    from endopheno.featurestore.store import history

    p = _feature_params(params)
    rows = []
    for name, d in definitions(p.definitions).items():
        path = Path(p.store) / name
        versions = history(path) if (path / "_delta_log").exists() else []
        rows.append({"name": name, "schema_version": d.schema_version, "producer": f"{d.model_name} {d.model_version}",
                     "versions": len(versions), "latest": versions[-1]["timestamp"].isoformat(timespec="seconds") if versions else "",
                     "description": d.description})
    _print_table(pa.Table.from_pylist(rows), "feature sets")


@features_app.command("show")
def features_show(name: str = typer.Argument(..., help="Feature set name."), params: Path = PARAMS) -> None:
    """A feature set's definition: producer and columns with their descriptions."""
    import pyarrow as pa

    from endopheno.featurestore.definitions import STANDARD_COLUMNS, definition

    d = definition(name, _feature_params(params).definitions)
    err.print(f"[bold]{d.name}[/bold] (schema_version {d.schema_version}): {d.description}\nproducer: "
              + ", ".join(f"{k}={v}" for k, v in d.producer.items()), soft_wrap=True)
    rows = [{"column": c, "type": t, "description": s} for c, (t, s) in STANDARD_COLUMNS.items()]
    rows += [{"column": c.name + (f"  (per {c.per})" if c.per else ""), "type": c.type, "description": c.description} for c in d.columns]
    _print_table(pa.Table.from_pylist(rows))


@features_app.command("history")
def features_history(name: str = typer.Argument(..., help="Feature set name."), params: Path = PARAMS) -> None:
    """Every version of a feature set: when, how many rows, which model version, git revision and MLflow run."""
    import pyarrow as pa

    from endopheno.featurestore.store import history

    rows = [{**h, "timestamp": h["timestamp"].isoformat(timespec="seconds")} for h in history(Path(_feature_params(params).store) / name)]
    keep = ("version", "timestamp", "rows", "model_name", "model_version", "git_revision", "mlflow_run_id", "volume_store_digest", "schema_version")
    _print_table(pa.Table.from_pylist([{k: r[k] for k in keep} for r in rows]), f"{name}: history")


def _report_build(report, t0: float) -> None:
    """A feature-set build's failed subjects (one line each), its summary; exit 1 if any failed."""
    for subject, reason in report.failed:
        err.print(f"[red]failed[/red] subject {subject}: {reason}", soft_wrap=True)
    err.print(f"{report.summary()} in {time.perf_counter() - t0:.1f} s", soft_wrap=True)
    if report.failed:
        raise typer.Exit(1)


@features_app.command("build")
def features_build(name: str = typer.Argument(..., help="Feature set name (a definition in features/)."),
                   params: Path = PARAMS, scheduler: Optional[str] = SCHEDULER) -> None:
    """Measure a feature set and commit it as a new version (nothing is written when the inputs are unchanged)."""
    from endopheno.featurestore.atlas import build_atlas_set
    from endopheno.featurestore.definitions import definition

    p = _feature_params(params)
    t0 = time.perf_counter()
    report = build_atlas_set(definition(name, p.definitions), p, scheduler=scheduler)
    _report_build(report, t0)


@app.command()
def catalog(params: Path = PARAMS) -> None:
    """Rebuild stores/catalog.duckdb: SQL views over the feature, cohort, genotype and GWAS stores."""
    from endopheno.featurestore.catalog import build_catalog

    s = build_catalog(_catalog_params(params))
    err.print(f"catalog {s['path']}: {s['feature_sets']} feature sets ({s['versions']} versions), genotypes "
              f"{'yes' if s['genotypes'] else 'none'}; built in {s['seconds']:.1f} s")


@app.command()
def sql(
    query: str = typer.Argument(..., help="SQL (SELECT/WITH/SHOW/DESCRIBE/EXPLAIN); statements that write are refused."),
    catalog: Optional[Path] = CATALOG,
    fmt: str = typer.Option("table", "--format", help="table | csv | json | parquet"),
    out: Optional[Path] = typer.Option(None, help="Write the result to this file instead of the terminal."),
    as_of: Optional[str] = typer.Option(None, help="VERSION or TIMESTAMP: unqualified `<set>` names the feature set as it was then."),
    params: Path = PARAMS,
) -> None:
    """Query the catalog (opened read-only)."""
    import io

    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from endopheno.featurestore.catalog import as_of_views, connect, query as run_query

    if fmt not in ("table", "csv", "json", "parquet"):
        raise EndophenoError(f"sql: --format {fmt}: use table, csv, json or parquet")
    if fmt == "parquet" and out is None:
        raise EndophenoError("sql: --format parquet needs --out FILE")
    if out is not None and not out.parent.is_dir():
        raise InputError(out, "its folder does not exist")
    con = connect(catalog or _catalog_params(params).path)
    if as_of:
        chosen = as_of_views(con, as_of)
        err.print("as of " + as_of + ": " + ", ".join(f"{s} = v{v}" for s, v in chosen.items()), soft_wrap=True)
    table = run_query(con, query)
    if fmt == "table" and out is None:
        _print_table(table)
        return
    if fmt == "parquet":
        pq.write_table(table, out)
        return
    if fmt == "json":
        text = json.dumps(table.to_pylist(), default=str, indent=1) + "\n"
    else:
        buf = io.BytesIO()
        pcsv.write_csv(table, buf)
        text = buf.getvalue().decode()
    if out:
        out.write_text(text)
    else:
        sys.stdout.write(text)


@app.command()
def cohort(
    feature_set: str = typer.Option(..., help="Feature set whose analysis cohort to report."),
    out: Optional[Path] = typer.Option(None, help="Folder for pheno.tsv and covar.tsv (PLINK style, for `endopheno gwas`)."),
    catalog: Optional[Path] = CATALOG,
    params: Path = PARAMS,
) -> None:
    """The analysis cohort (features ⨝ QC ⨝ participants ⨝ genotyped samples ⨝ PCs) and who dropped out where, and why."""
    from endopheno.featurestore.catalog import connect
    from endopheno.featurestore.cohort import STEPS, export, report

    cp = _catalog_params(params)
    con = connect(catalog or cp.path)
    r = report(con, feature_set)
    for step in STEPS:
        for subject, reason in r.dropped.get(step, []):
            err.print(f"dropped at {step}: {subject}: {reason}", soft_wrap=True)
    if out:
        written = export(con, feature_set, out, cp.covariates)
        err.print(f"wrote {', '.join(map(str, written.values()))}")
    err.print(r.summary(), soft_wrap=True)


@app.command()
def lineage(
    target: str = typer.Argument(..., help="FEATURE_SET[@VERSION], or a GWAS run (MLflow run id or output folder) with --gwas."),
    gwas_run: bool = typer.Option(False, "--gwas", help="TARGET is a GWAS run."),
    params: Path = PARAMS,
) -> None:
    """Trace a feature-set version or a GWAS run back to model version, MLflow run, volume-store digest and git revision."""
    from endopheno.featurestore.lineage import feature_lineage, gwas_lineage

    p = _feature_params(params)
    if gwas_run:
        chain = gwas_lineage(target, p.store, p.tracking_uri)
    else:
        name, _, version = target.partition("@")
        if version and not version.isdigit():
            raise EndophenoError(f"lineage: {target}: the version after @ must be a number")
        chain = feature_lineage(p.store, name, int(version) if version else None)
    for key, value in chain.items():
        print(f"{key}: {value}")


@app.command()
def train(
    model: str = typer.Argument(..., help="A model of params.yaml train.models (e.g. cnn3d, autoencoder3d)."),
    folds: Optional[int] = typer.Option(None, help="Outer cross-validation folds (default: params.yaml)."),
    epochs: Optional[int] = typer.Option(None, help="Maximum epochs (default: the model's entry)."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda."),
    metrics: Optional[Path] = typer.Option(None, help="Also write the cross-validated metrics and the registered "
                                           "version here (JSON; the DVC stage's metrics file)."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameter file; its `train` section is used."),
) -> None:
    """Train a model with grouped, stratified k-fold cross-validation and baselines; register it in MLflow
    as endopheno.MODEL (the best version holds the alias `champion`). Rerunning resumes an interrupted run."""
    from dataclasses import replace

    from endopheno.models.train import load_train_params, model_spec, train as train_model
    from endopheno.params import load_params

    p = load_train_params(load_params("train", params))
    model_spec(p, model)   # unknown names fail before any volume is read
    p = replace(p, device=device or p.device)
    # on the model's own entry, which a model's `folds` or `epochs` would otherwise override
    overrides = {k: v for k, v in {"folds": folds, "epochs": epochs}.items() if v is not None}
    p = replace(p, models={**p.models, model: {**p.models[model], **overrides}})
    model_spec(p, model)   # and the values given here
    t0 = time.perf_counter()
    report = train_model(p, model)
    if report.excluded:
        err.print(f"{len(report.excluded)} subjects left out (first: "
                  + "; ".join(f"{s}: {r}" for s, r in report.excluded[:3]) + ")", soft_wrap=True)
    if metrics:
        metrics.parent.mkdir(parents=True, exist_ok=True)
        metrics.write_text(json.dumps({"model": f"endopheno.{report.name}", "version": report.version,
                                       "champion": report.champion, "mlflow_run_id": report.run_id,
                                       **{k: round(v, 6) for k, v in report.summary.items()}}, indent=1))
    err.print(f"{report.line()} in {time.perf_counter() - t0:.0f} s", soft_wrap=True)


@app.command()
def extract(
    feature_set: str = typer.Option(..., help="Feature set to write (a definition in features/, e.g. ae_t1)."),
    model: Optional[str] = typer.Option(None, help="Registered model NAME@ALIAS or NAME/VERSION "
                                        "(default: the definition's producer.model)."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameter file; its `extract` section is used."),
) -> None:
    """Run a registered model over every preprocessed subject and commit its features as a new version of
    the feature set (nothing is written when model version and volumes are unchanged)."""
    from endopheno.featurestore.definitions import definition
    from endopheno.models.extract import ExtractParams, extract as extract_set
    from endopheno.params import from_section, load_section

    p = from_section(ExtractParams, load_section("extract", params), "extract")
    t0 = time.perf_counter()
    report = extract_set(definition(feature_set, p.definitions), p, model)
    _report_build(report, t0)


@app.command()
def attribute(
    model: Optional[str] = typer.Option(None, help="Registered model NAME@ALIAS or NAME/VERSION, or a train.models "
                                        "entry (its attribute.alias version); default: every model of attribute.models."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated: integrated_gradients, lrp, guided_gradcam, "
                                          "occlusion (default: params.yaml)."),
    subjects: Optional[int] = typer.Option(None, help="Subjects explained, stratified by diagnosis (default: params.yaml)."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameter file; its `attribute` section is used."),
) -> None:
    """Attribution maps of a registered model (group averages as NIfTI, figures, completeness and randomisation
    checks, scores against a truth map beside a linear SVM's pattern), and an autoencoder's latent-to-region map;
    written to stores/attribution/MODEL and logged to MLflow."""
    from endopheno.attribution.run import attribute_model, load_attribute_params, model_uris
    from endopheno.params import load_section

    section = dict(load_section("attribute", params))
    if subjects is not None:
        section["subjects"] = subjects
    if methods:
        section["methods"] = [m.strip() for m in methods.split(",") if m.strip()]
    p = load_attribute_params(section)
    failed = 0
    for uri in model_uris(p, [model] if model else None):
        report = attribute_model(p, uri)
        _report_attribution(report)
        failed += len(report.failed)
    if failed:
        raise typer.Exit(1)


def _report_attribution(report) -> None:
    """An attribution run's table (method × checks and scores, the SVM baseline last), its skipped methods
    (one line per reason), failed subjects, notes, the first dimensions' regions and the summary line."""
    import pyarrow as pa

    scores = report.scores.set_index("method") if report.scores is not None else None
    rows = []
    for m in report.methods:
        if m.status != "ok":
            continue
        row = {"method": m.method, "subjects": m.subjects,
               "IG completeness (median / max)": "" if np.isnan(m.completeness_median)
               else f"{m.completeness_median:.4f} / {m.completeness_max:.4f}",
               "randomised ρ": None if np.isnan(m.randomisation_rank_correlation) else m.randomisation_rank_correlation}
        if scores is not None:
            row.update(auc=scores.auc.get(m.method), dice_top5=scores.dice_top5.get(m.method),
                       auc_randomised=scores.auc_randomised.get(m.method))
        rows.append(row)
    if scores is not None and "svm_haufe" in scores.index:
        rows.append({"method": "svm_haufe (baseline)", "subjects": None, "IG completeness (median / max)": "",
                     "randomised ρ": None, "auc": scores.auc["svm_haufe"], "dice_top5": scores.dice_top5["svm_haufe"],
                     "auc_randomised": None})
    if rows:
        _print_table(pa.Table.from_pylist(rows), f"{report.model}/{report.version}")
    reasons = {}
    for m in report.skipped:
        reasons.setdefault(m.reason, []).append(m.method)
    for reason, names in reasons.items():
        err.print(f"[yellow]skipped[/yellow] {', '.join(names)} on {report.model}/{report.version}: {reason}", soft_wrap=True)
    for subject, reason in report.failed:
        err.print(f"[red]failed[/red] subject {subject}: {reason}", soft_wrap=True)
    for note in report.notes:
        err.print(note, soft_wrap=True)
    if report.latent_regions is not None:
        from endopheno.attribution.regions import top_regions

        top = top_regions(report.latent_regions, 2).head(5)
        err.print("latent → regions (first dimensions): " + "; ".join(f"{d}: {r}" for d, r in zip(top.dimension, top.regions)),
                  soft_wrap=True)
    err.print(report.summary(), soft_wrap=True)


@app.command()
def report(params: Path = typer.Option(Path("params.yaml"), help="Parameter file; its `report` section is used if present.")) -> None:
    """Write the report folder (stores/report: index.html, the figures as PNG, report.json): cohort, QC,
    models, attribution, GWAS, validation and lineage. A section whose input is missing names the command
    that writes it."""
    from endopheno.params import load_section
    from endopheno.report import build_report, load_report_params

    section = load_section("report", params)
    summary = build_report(load_report_params(section))
    for reason in summary.missing:
        err.print(f"[yellow]missing[/yellow] {reason}", soft_wrap=True)
    err.print(summary.line(), soft_wrap=True)


@app.command()
def models(tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: sqlite:///stores/mlflow.db).")) -> None:
    """The model registry: every registered endopheno model version, its tags and aliases."""
    import mlflow
    import pyarrow as pa

    from endopheno.tracking import tracking_uri as uri

    tracking_uri = uri(tracking_uri)
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        # MLflow would create an empty store there, and the registry would look empty
        raise InputError(tracking_uri.removeprefix("sqlite:///"), "no MLflow tracking store here (`endopheno train` creates it)")
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    rows = []
    for registered in client.search_registered_models():
        aliases = client.get_registered_model(registered.name).aliases   # search results leave them out
        for v in client.search_model_versions(f"name='{registered.name}'"):
            rows.append({"model": registered.name, "version": int(v.version),
                         "aliases": ",".join(a for a, version in aliases.items() if str(version) == str(v.version)),
                         "task": v.tags.get("task", ""), "metric": v.tags.get("metric", ""), "cv_value": v.tags.get("cv_value", ""),
                         "folds": v.tags.get("folds", ""), "run": v.run_id[:8]})
    rows.sort(key=lambda r: (r["model"], r["version"]))
    _print_table(pa.Table.from_pylist(rows) if rows else pa.table({"model": pa.array([], pa.string())}), "model registry")


def _feature_set_cohort(target: str, out: Path, params: Path, covar: Optional[Path]):
    """Export a feature set's analysis cohort (the catalog's SQL join, on the stores as they are now) as
    the GWAS's pheno/covar tables."""
    from endopheno.featurestore.catalog import cohort_catalog
    from endopheno.featurestore.cohort import export

    name, _, version = target.partition("@")
    if version and not version.isdigit():
        raise EndophenoError(f"gwas: --feature-set {target}: the version after @ must be a number")
    cp = _catalog_params(params)
    con = cohort_catalog(cp)
    written = export(con, name, out, cp.covariates, int(version) if version else None)
    chosen = json.loads(Path(f"{written['pheno.tsv']}.lineage.json").read_text())["version"]
    err.print(f"gwas: feature set {name} v{chosen}: analysis cohort written to {out}")
    return (written["pheno.tsv"], covar or written["covar.tsv"],
            {"feature_set": name, "feature_set_version": chosen}, Path(cp.genotypes))


def main() -> None:
    """Console entry point: user errors become one line and exit status 2."""
    try:
        app()
    except EndophenoError as e:
        err.print(f"[red]error:[/red] {e}", soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
