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

from endopheno.errors import EndophenoError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="endopheno: a versioned feature store for imaging genetics.")
err = Console(stderr=True, highlight=False)

WORKERS = typer.Option(None, help="Parallel worker processes (default: one per core).")
SCHEDULER = typer.Option(None, help="Address of an existing dask scheduler (e.g. tcp://host:8786) to run on.")


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
    workers: Optional[int] = WORKERS,
    scheduler: Optional[str] = SCHEDULER,
) -> None:
    """Validate NIfTI files and store them losslessly in the volume store (incremental)."""
    from endopheno.volumes.ingest import ingest as run, inputs_from_bids, inputs_from_manifest

    if (bids is None) == (manifest is None):
        raise EndophenoError("ingest: give exactly one of --bids DIR or --manifest FILE.csv")
    t0 = time.perf_counter()
    inputs, rejected = inputs_from_bids(bids) if bids else inputs_from_manifest(manifest)
    report = run(inputs, store, rejected=rejected, workers=workers, scheduler=scheduler)
    for what, reason in report.rejected:
        err.print(f"[red]rejected[/red] {what}: {reason}", soft_wrap=True)
    seconds = time.perf_counter() - t0
    err.print(f"{report.summary()} in {seconds:.1f} s ({len(report.ingested) / seconds:.1f} volumes/s)")
    if report.rejected and not allow_rejected:
        raise typer.Exit(1)


@app.command()
def preprocess(
    store: Path = typer.Option(..., help="Volume store holding ingested native volumes."),
    qc_dir: Optional[Path] = typer.Option(None, help="Where to write qc.tsv and montage.png (default: beside the store, in qc/)."),
    voxel_size: Optional[float] = typer.Option(None, help="Output voxel size in mm (default: params.yaml or 2)."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameter file; its `preprocess` section is used if present."),
    workers: Optional[int] = WORKERS,
    scheduler: Optional[str] = SCHEDULER,
) -> None:
    """Bring every native volume into MNI space: reorient, N4, affine registration, resample, mask, normalise."""
    from endopheno.params import load_params
    from endopheno.volumes.preprocess import PreprocessParams, open_mni, preprocess as run
    from endopheno.volumes.qc import montage, qc_table

    section = load_params(None, params).get("preprocess", {}) if params.exists() else {}
    p = PreprocessParams.from_dict({**section, **({"voxel_size_mm": voxel_size} if voxel_size else {})})
    t0 = time.perf_counter()
    report = run(store, p, workers=workers, scheduler=scheduler)
    seconds = time.perf_counter() - t0
    for subject, reason in report.failed:
        err.print(f"[red]failed[/red] subject {subject}: {reason}", soft_wrap=True)
    for subject, corr in report.qc_failed:
        err.print(f"[yellow]flagged[/yellow] subject {subject}: correlation with template {corr:.3f} < {p.qc_min_correlation}")
    qc_dir = qc_dir or store.parent / "qc"
    qc_dir.mkdir(parents=True, exist_ok=True)
    ds = open_mni(store)
    qc_table(ds).to_csv(qc_dir / "qc.tsv", sep="\t", index=False)
    montage(ds, qc_dir / "montage.png", p.modality)
    err.print(f"{report.summary()} in {seconds:.1f} s ({60 * len(report.processed) / seconds:.1f} subjects/min); QC in {qc_dir}")
    if report.failed:
        raise typer.Exit(1)


genotypes_app = typer.Typer(no_args_is_help=True, help="The genotype store: PLINK files in; QC'd dosages, tables and PCs out.")
app.add_typer(genotypes_app, name="genotypes")


@genotypes_app.command("import")
def genotypes_import(
    out: Path = typer.Option(..., help="Genotype store folder to write, e.g. stores/genotypes/<name> (replaced whole)."),
    bfile: Optional[Path] = typer.Option(None, help="PLINK 1 prefix: PREFIX.bed/.bim/.fam."),
    pfile: Optional[Path] = typer.Option(None, help="PLINK 2 prefix: PREFIX.pgen/.pvar/.psam."),
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
    from endopheno.params import load_params

    p = ImportParams.from_dict(load_params(None, params).get("genotypes") if params.exists() else None)
    t0 = time.perf_counter()
    source = open_source(bfile=bfile, pfile=pfile)
    ids = imaging_subjects(subjects) if subjects else None
    report = import_genotypes(source, out, p, subjects=ids, subjects_from=str(subjects) if subjects else None,
                              workers=workers, scheduler=scheduler)
    err.print(f"{report.summary()} in {time.perf_counter() - t0:.1f} s", soft_wrap=True)


@app.command()
def gwas(
    out: Path = typer.Option(..., help="Output folder: results/ (Parquet), hits, loci, plots, summary.json."),
    pheno: Path = typer.Option(..., help="Phenotype table (PLINK 2 style: header, [FID] IID, NA = missing)."),
    bfile: Optional[Path] = typer.Option(None, help="PLINK 1 prefix: PREFIX.bed/.bim/.fam."),
    pfile: Optional[Path] = typer.Option(None, help="PLINK 2 prefix: PREFIX.pgen/.pvar/.psam."),
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
    mlflow: bool = typer.Option(True, help="Record the run in MLflow."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: sqlite:///stores/mlflow.db)."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameter file; its `gwas` section gives the defaults."),
    workers: Optional[int] = WORKERS,
    scheduler: Optional[str] = SCHEDULER,
) -> None:
    """Test every phenotype against every variant (linear regression with covariates, exact like plink2 --glm)."""
    from endopheno.genotypes.sources import open_source
    from endopheno.gwas.phenotypes import Aligned, align, read_table
    from endopheno.gwas.results import ClumpParams
    from endopheno.gwas.run import GwasOptions, scan
    from endopheno.gwas.study import StudySettings, analyse, track
    from endopheno.genotypes.store import file_sha256
    from endopheno.params import from_section, load_params

    section = dict(load_params(None, params).get("gwas") or {}) if params.exists() else {}
    given = {"missing": missing, "precision": precision, "min_maf": min_maf, "min_mac": min_mac, "device": device,
             "block_variants": block_variants, "workers": workers, "scheduler": scheduler}
    options = from_section(GwasOptions, {**section, **{k: v for k, v in given.items() if v is not None}}, "gwas",
                           ignore={"genome_wide", "clump", "tracking_uri"})
    settings = StudySettings(genome_wide=section.get("genome_wide", 5e-8), clump=ClumpParams(**section.get("clump", {})))
    source = open_source(bfile=bfile, pfile=pfile, store=genotypes)
    split = (lambda names: [n.strip() for n in names.split(",") if n.strip()] if names else None)
    phenotypes = align(read_table(pheno, split(pheno_name)), source.samples)
    covariates = align(read_table(covar, split(covar_name), kind="covariate"), source.samples) if covar else None
    if pcs:
        columns = [f"pc{i}" for i in range(1, pcs + 1)]
        if not set(columns) <= set(source.samples.columns):
            raise EndophenoError(f"gwas: --pcs {pcs} needs a genotype store with at least {pcs} PCs (--genotypes)")
        pc_values = source.samples[columns].to_numpy(dtype=float)
        covariates = Aligned(pc_values, columns) if covariates is None else Aligned(
            np.hstack([covariates.values, pc_values]), covariates.names + columns, covariates.unmatched)
    for what, table in (("phenotype", phenotypes), ("covariate", covariates)):
        if table is not None and table.unmatched:
            err.print(f"[yellow]{len(table.unmatched)} {what} rows match no genotyped sample[/yellow] "
                      f"(first: {', '.join(table.unmatched[:5])}); they are not used", soft_wrap=True)
    without = int(np.isnan(phenotypes.values).all(axis=1).sum())
    if without:
        err.print(f"{without} of {len(source.samples)} genotyped samples have no phenotype value")

    summary = scan(source, phenotypes, covariates, out, options)
    study = analyse(out, source, phenotypes, covariates, settings)
    run_id = None
    if mlflow:
        inputs = {"genotypes": str(source.path), "genotypes_digest": getattr(source, "digest", ""),
                  "pheno": str(pheno), "pheno_sha256": file_sha256(pheno), "phenotypes": len(phenotypes.names),
                  "covariates": ",".join(covariates.names) if covariates else ""}
        scan_record = json.loads((out / "scan.json").read_text())
        run_id = track(out, study, scan_record, inputs, uri=tracking_uri or section.get("tracking_uri"), settings=settings)
    untested = sum(summary.untested.values())
    err.print(f"gwas: {len(phenotypes.names)} phenotypes × {summary.variants} variants: {summary.tests} tests in "
              f"{summary.seconds:.1f} s ({summary.tests_per_second:,.0f}/s)"
              + (f", {untested} untestable ({', '.join(summary.untested)})" if untested else "")
              + f"; λGC median {study['lambda_gc_median']:.3f}; {study['hits_genome_wide']} genome-wide hits in "
              f"{study['loci']} loci ({study['loci_study_wide']} study-wide); results in {out}"
              + (f"; MLflow run {run_id}" if run_id else ""), soft_wrap=True)


def main() -> None:
    """Console entry point: user errors become one line and exit status 2."""
    try:
        app()
    except EndophenoError as e:
        err.print(f"[red]error:[/red] {e}", soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
