"""Ingest: NIfTI files (a BIDS folder or a CSV manifest) -> the native part of the volume store.

Incremental: a file whose path, size and modification time match what the store recorded is skipped
without being read; one whose content hash matches is only re-stamped; anything else is converted.
Every bad file is reported with one line and the rest go through.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import zarr

from endopheno import __version__
from endopheno.errors import EndophenoError, InputError
from endopheno.parallel import map_items
from endopheno.volumes.nifti import read_volume
from endopheno.volumes.store import NATIVE, ScanKey, clean_staging, ensure_groups, header_attrs, native_attrs, open_store, publish, write_native

log = logging.getLogger(__name__)

LABEL = re.compile(r"^[A-Za-z0-9]+$")  # a BIDS label: letters and digits only
BIDS_FILE = re.compile(r"^sub-(?P<sub>[A-Za-z0-9]+)(?:_ses-(?P<ses>[A-Za-z0-9]+))?(?:_[a-z]+-[A-Za-z0-9]+)*?(?:_run-(?P<run>\d+))?(?:_[a-z]+-[A-Za-z0-9]+)*_(?P<suffix>[A-Za-z0-9]+)\.nii(?:\.gz)?$")


@dataclass(frozen=True)
class ScanInput:
    key: ScanKey
    path: Path
    run: int = 0


@dataclass
class IngestReport:
    ingested: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (what, reason)
    kept_absent: int = 0  # volumes in the store that this input no longer lists (kept, never deleted)

    def summary(self) -> str:
        s = f"ingest: {len(self.ingested)} ingested, {len(self.unchanged)} unchanged, {len(self.rejected)} rejected"
        return s + (f", {self.kept_absent} in the store but not in this input (kept)" if self.kept_absent else "")


def inputs_from_bids(bids: str | Path) -> tuple[list[ScanInput], list[tuple[str, str]]]:
    """Anatomical images of a BIDS dataset: sub-*/[ses-*/]anat/*.nii[.gz]. Returns (inputs, rejected).

    A file whose name's sub-/ses- labels differ from its folders' is rejected: it would be stored under
    another subject or session than the one it lies in."""
    bids = Path(bids)
    if not bids.is_dir():
        raise EndophenoError(f"{bids}: not a directory (expected a BIDS dataset)")
    inputs, rejected = [], []
    for path in sorted(bids.glob("sub-*/anat/*.nii*")) + sorted(bids.glob("sub-*/ses-*/anat/*.nii*")):
        m = BIDS_FILE.match(path.name)
        if not m:
            rejected.append((str(path), "file name does not follow BIDS (sub-<label>[_ses-<label>]..._<suffix>.nii[.gz])"))
            continue
        folders = path.parent.parent.relative_to(bids).parts  # ("sub-x",) or ("sub-x", "ses-y")
        named = (f"sub-{m['sub']}",) + ((f"ses-{m['ses']}",) if m["ses"] else ())
        if named != folders:
            rejected.append((str(path), f"its name says {'_'.join(named)} but it lies in {path.parent.relative_to(bids).as_posix()} "
                                        "(a BIDS file name repeats its folders' labels)"))
            continue
        inputs.append(ScanInput(ScanKey(m["sub"], m["ses"], m["suffix"]), path, int(m["run"] or 0)))
    if not inputs and not rejected:
        raise EndophenoError(f"{bids}: no sub-*/anat/*.nii[.gz] files found (is this a BIDS dataset?)")
    return inputs, rejected


def inputs_from_manifest(manifest: str | Path) -> tuple[list[ScanInput], list[tuple[str, str]]]:
    """Rows of a CSV with columns subject_id, path and optional session, modality (default T1w).
    Relative paths are relative to the manifest's folder."""
    manifest = Path(manifest)
    try:
        table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise EndophenoError(f"{manifest}: no such manifest") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise EndophenoError(f"{manifest}: not a readable CSV ({e})") from None
    missing = {"subject_id", "path"} - set(table.columns)
    if missing:
        raise EndophenoError(f"{manifest}: missing column(s) {', '.join(sorted(missing))} (need subject_id,path[,session,modality])")
    inputs, rejected = [], []
    for line, row in zip(range(2, len(table) + 2), table.itertuples()):
        subject = row.subject_id.strip().removeprefix("sub-")
        session = (getattr(row, "session", "") or "").strip().removeprefix("ses-") or None
        modality = (getattr(row, "modality", "") or "").strip() or "T1w"
        where = f"{manifest}:{line}"
        bad = [(n, v) for n, v in (("subject_id", subject), ("session", session), ("modality", modality)) if v is not None and not LABEL.match(v)]
        if bad:
            rejected.append((where, f"{bad[0][0]} '{bad[0][1]}' is not a valid label (letters and digits only)"))
            continue
        if not row.path.strip():
            rejected.append((where, "empty path"))
            continue
        path = Path(row.path.strip())
        inputs.append(ScanInput(ScanKey(subject, session, modality), path if path.is_absolute() else manifest.parent / path))
    return inputs, rejected


def _drop_duplicates(inputs: list[ScanInput]) -> tuple[list[ScanInput], list[tuple[str, str]]]:
    """One volume per (subject, session, modality). Several BIDS runs: the first run is kept. Any other
    duplicate is ambiguous, so every copy is rejected rather than one picked silently."""
    by_key: dict[ScanKey, list[ScanInput]] = defaultdict(list)
    for item in inputs:
        by_key[item.key].append(item)
    kept, rejected = [], []
    for key, items in by_key.items():
        if len(items) == 1:
            kept.append(items[0])
            continue
        if len({i.run for i in items}) == len(items):  # distinct BIDS runs
            first = min(items, key=lambda i: i.run)
            kept.append(first)
            rejected += [(str(i.path), f"another run of {key} (run {first.run} is ingested)") for i in items if i is not first]
            continue
        for i in items:
            others = ", ".join(str(o.path) for o in items if o is not i)
            rejected.append((str(i.path), f"duplicate {key} (also given by {others})"))
    return kept, rejected


def _source_stat(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def ingest_one(item: ScanInput, store: str, previous_sha256: str | None) -> str:
    """Worker: validate one file and write it to the store. Returns "ingested" or "unchanged"."""
    volume = read_volume(item.path)
    try:
        stat = _source_stat(item.path)
    except OSError as e:
        raise InputError(item.path, f"cannot stat ({e})") from None
    source = {**stat, "sha256": volume.sha256}
    if volume.sha256 == previous_sha256:  # touched, not changed: re-stamp the source, keep the voxels
        arr = zarr.open_array(f"{store}/{item.key.path}", mode="r+")
        arr.attrs["source"] = source
        return "unchanged"
    attrs = {
        "subject_id": item.key.subject_id, "session": item.key.session, "modality": item.key.modality,
        **header_attrs(volume.image, volume.header_bytes), "shape": list(volume.raw.shape), "dtype": str(volume.raw.dtype),
        "source": source, "notes": volume.notes,
        "ingested_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "endopheno_version": __version__,
    }
    write_native(store, item.key, volume.raw, attrs)
    return "ingested"


def ingest(inputs: list[ScanInput], store: str | Path, *, rejected: list[tuple[str, str]] | None = None,
           workers: int | None = None, scheduler: str | None = None) -> IngestReport:
    """Bring `inputs` into the store at `store`, converting only what is new or changed."""
    store = str(store)
    report = IngestReport(rejected=list(rejected or []))
    inputs, dup = _drop_duplicates(inputs)
    report.rejected += dup
    clean_staging(store)
    open_store(store)
    existing = native_attrs(store)
    todo = []
    for item in inputs:
        prev = existing.get(item.key, {}).get("source")
        try:
            stat = _source_stat(item.path)
        except OSError:
            stat = None  # let the worker give the precise reason
        if prev and stat and all(prev[k] == stat[k] for k in ("path", "size", "mtime_ns")):
            report.unchanged.append(str(item.key))
        else:
            todo.append((item, prev["sha256"] if prev else None))
    report.kept_absent = len(set(existing) - {i.key for i in inputs})
    ensure_groups(store, [item.key for item, _ in todo])
    for (item, _, _), result in map_items(_ingest_task, [(i, store, sha) for i, sha in todo], workers=workers, scheduler=scheduler, label="ingest"):
        if isinstance(result, InputError):
            report.rejected.append((result.what, result.reason))
            log.debug("rejected %s: %s", result.what, result.reason)
        elif isinstance(result, Exception):
            report.rejected.append((str(item.path), str(result)))
            log.debug("rejected %s: %s", item.path, result)
        elif result == "unchanged":
            report.unchanged.append(str(item.key))
        else:
            report.ingested.append(str(item.key))
    root = open_store(store)
    root.require_group(NATIVE).attrs["last_ingest"] = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "ingested": len(report.ingested),
        "unchanged": len(report.unchanged), "rejected": [{"what": w, "reason": r} for w, r in report.rejected],
    }
    clean_staging(store)
    publish(store)
    return report


def _ingest_task(args) -> str:
    item, store, sha = args
    return ingest_one(item, store, sha)
