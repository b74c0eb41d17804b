"""Genotyped samples versus imaging subjects: a sample's IID is the subject_id (BIDS participant label
without ``sub-``). Nothing is dropped here; the cohort join drops the unmatched, and this says how many
it will drop, and which."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from endopheno.errors import InputError


def imaging_subjects(path: str | Path) -> list[str]:
    """Subject IDs of the imaging cohort, from a volume store (its ``native/`` subjects) or a
    participants table (.tsv or .csv with a ``participant_id`` or ``subject_id`` column)."""
    path = Path(path)
    if (path / "zarr.json").is_file():
        return _volume_store_subjects(path)
    if not path.is_file():
        raise InputError(path, "not found (expected a volume store or a participants.tsv)")
    try:
        table = pd.read_csv(path, sep="," if path.suffix.lower() == ".csv" else "\t", dtype=str)
    except Exception as e:
        raise InputError(path, f"cannot be parsed as a participants table ({e})") from None
    if "participant_id" in table:
        return sorted(table["participant_id"].str.removeprefix("sub-"))
    if "subject_id" in table:
        return sorted(table["subject_id"])
    raise InputError(path, "has no participant_id or subject_id column")


def _volume_store_subjects(path: Path) -> list[str]:
    import zarr

    root = zarr.open_group(str(path), mode="r", use_consolidated=False)
    if "native" not in root:
        raise InputError(path, "volume store has no subjects yet (run `endopheno ingest`)")
    return sorted(root["native"].group_keys())


def match_ids(iids, subjects, removed_iids=()) -> dict:
    """How the genotype store's samples (`iids`) meet the imaging `subjects`.

    Returns counts and sorted ID lists: ``matched``, ``genotyped_not_imaged`` (samples in the store with
    no imaging subject), ``imaged_not_genotyped`` (subjects with no sample in the store), and among
    those, ``imaged_removed_by_qc`` (subjects whose genotypes QC removed, `removed_iids`).
    """
    iids, subjects, removed = set(map(str, iids)), set(map(str, subjects)), set(map(str, removed_iids))
    not_genotyped = sorted(subjects - iids)
    return {
        "genotyped_samples": len(iids), "imaging_subjects": len(subjects), "matched": len(iids & subjects),
        "genotyped_not_imaged": sorted(iids - subjects), "imaged_not_genotyped": not_genotyped,
        "imaged_removed_by_qc": sorted(set(not_genotyped) & removed),
    }
