"""The report: one self-contained folder that walks a reader through the whole chain's result.

``endopheno report`` reads what the stages wrote (params.yaml ``report``) and writes ``<out>/index.html``:
the cohort, the imaging QC montage, each model's cross-validated metrics beside its baseline, the
attribution tables and maps, each feature set's GWAS (λGC, Manhattan and QQ plots, independent loci with
their lead variants and, for an autoencoder's latent set, the region each hit dimension maps to), the
validation against the phantom's truth, and the lineage of every result. Every figure is copied as PNG
into ``<out>/figures/`` and referenced by relative path, the page has no script and no external URL, so
the folder opens offline wherever it is copied. ``<out>/report.json`` records each section as present,
partial or missing, with the reasons.

A section whose input is missing says which command writes it; the report never fails because a later
stage has not run. The folder is written beside its destination and renamed into place, so an
interrupted run leaves the previous report whole.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from html import escape
from pathlib import Path

from endopheno.report import sections
from endopheno.report.html import Figures, Section, page
from endopheno.report.lineage import Tracking, feature_set_origin, lineage_section

__all__ = ["ReportParams", "ReportSummary", "build_report", "load_report_params"]


@dataclass(frozen=True)
class ReportParams:
    """The ``report`` section of params.yaml."""

    out: str = "stores/report"
    participants: str = "data/phantom/bids/participants.tsv"
    qc_dir: str = "stores/qc"                   # qc.tsv and montage.png of `endopheno preprocess`
    models_dir: str = "stores/models"           # <model>/metrics.json of `endopheno train --metrics`
    models: tuple[str, ...] = ("cnn3d", "autoencoder3d")
    attribution: str = "stores/attribution"     # <model>/ of `endopheno attribute`
    gwas: str = "stores/gwas"                   # <feature set>/ of `endopheno gwas --feature-set`
    feature_sets: tuple[str, ...] = ("atlas_regions", "ae_t1", "cnn3d_t1", "ae_t1_random")
    validation: str = "stores/validation"       # validation.json and loci.tsv
    features: str = "stores/features"           # the feature store: which model version made a feature-set version
    tracking_uri: str | None = "sqlite:///stores/mlflow.db"


def load_report_params(section: dict | None) -> ReportParams:
    from endopheno.params import from_section

    p = from_section(ReportParams, section, "report")
    return replace(p, models=tuple(p.models), feature_sets=tuple(p.feature_sets))


@dataclass
class ReportSummary:
    index: Path
    sections: dict[str, str]                    # key -> present | partial | missing
    figures: int
    seconds: float = 0.0
    missing: list[str] = field(default_factory=list)

    def line(self) -> str:
        counts = {status: [k for k, v in self.sections.items() if v == status] for status in ("present", "partial", "missing")}
        text = f"report {self.index}: {len(counts['present'])} of {len(self.sections)} sections complete"
        for status in ("partial", "missing"):
            if counts[status]:
                text += f", {status}: {', '.join(counts[status])}"
        return text + f"; {self.figures} figures; in {self.seconds:.1f} s"


def build_report(p: ReportParams) -> ReportSummary:
    """Write the report folder `p.out` (index.html, figures/, report.json) as the module's docstring says."""
    from endopheno.tracking import git_revision

    t0 = time.perf_counter()
    final = Path(p.out)
    staging = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        figs = Figures(staging)
        gwas = {name: Path(p.gwas) / name for name in p.feature_sets if (Path(p.gwas) / name / "summary.json").exists()}
        scans = {name: json.loads((folder / "scan.json").read_text()) for name, folder in gwas.items()
                 if (folder / "scan.json").exists()}
        origins = {name: feature_set_origin(folder, p.features, name) for name, folder in gwas.items()}
        model_section, metrics = sections.models(Path(p.models_dir), p.models)
        revision = git_revision()
        parts: list[Section] = [
            sections.cohort(Path(p.participants), Path(p.qc_dir) / "qc.tsv", scans),
            sections.qc_montage(Path(p.qc_dir), figs),
            model_section,
            sections.attribution(Path(p.attribution), p.models, figs),
            sections.association(Path(p.gwas), p.feature_sets, Path(p.attribution), p.models, origins, figs),
            sections.validation(Path(p.validation)),
            lineage_section(metrics, origins, gwas, Tracking(p.tracking_uri), revision),
        ]
        created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        meta = f"Made {escape(created)} from git revision <code>{escape(revision)}</code> by <code>endopheno report</code>."
        (staging / "index.html").write_text(page("endopheno report", meta, parts))
        record = {"created": created, "git_revision": revision, "figures": figs.paths,
                  "sections": {s.key: {"title": s.title, "status": s.status, "missing": s.missing} for s in parts}}
        (staging / "report.json").write_text(json.dumps(record, indent=1) + "\n")
        _replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ReportSummary(final / "index.html", {s.key: s.status for s in parts}, len(figs.paths),
                         time.perf_counter() - t0, [m for s in parts for m in s.missing])


def _replace(staging: Path, final: Path) -> None:
    """Swap the finished folder in; the previous report is moved aside first and removed after."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
