"""The `endopheno` command: a thin layer over the library. A user's mistake prints one line and exits 2;
a run that finished but rejected some inputs exits 1 after its summary."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Optional

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
    for noisy in ("msprime", "distributed", "numcodecs", "matplotlib", "asyncio", "tornado", "bed_reader", "root"):
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


def main() -> None:
    """Console entry point: user errors become one line and exit status 2."""
    try:
        app()
    except EndophenoError as e:
        err.print(f"[red]error:[/red] {e}", soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
