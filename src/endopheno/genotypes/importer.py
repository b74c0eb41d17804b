"""`import_genotypes`: a PLINK source -> a genotype store (see `store` for the layout).

Two streaming passes over the source, in blocks of `chunk_variants` variants: the first counts each
sample's missing calls (the ``mind`` filter) and finds whether any dosage is fractional (a .pgen is read
as dosages; one without a fractional dosage is stored as 1-byte hard calls); the second computes every
variant's statistics on the kept samples, applies the variant filters, appends the kept variants to the
Zarr array and feeds the common ones to the LD pruner. The PCs are then computed from the pruned variants
of the new array with dask. Memory is bounded by a block (chunk_variants × samples values) plus
per-variant statistics.

Everything is written into a sibling folder ``<store>.partial-*`` and renamed into place at the end, so
a crash leaves the previous store whole (or, in the instant between the two renames, beside its name as
``<store>.old-*``); a rerun removes such leftovers and completes the import.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from endopheno.errors import EndophenoError, InputError
from endopheno.genotypes import store as layout
from endopheno.genotypes.ids import match_ids
from endopheno.genotypes.pca import LDPruner, PCAParams, genetic_pcs, standardise
from endopheno.genotypes.qc import (QCParams, counted_missing, missing_calls, sample_filter, sex_chromosome,
                                    variant_counts, variant_filter, variant_stats)
from endopheno.genotypes.sources import MISSING
from endopheno.parallel import default_workers, progress

log = logging.getLogger(__name__)
SIDECARS = {".bed": (".bim", ".fam"), ".pgen": (".pvar", ".psam")}
PIPELINE_KEYS = {"source", "format", "store", "subjects", "workers"}  # params.yaml keys the stage script reads


@dataclass(frozen=True)
class ImportParams:
    """The `genotypes` section of params.yaml that shapes a store (and enters its digest)."""

    qc: QCParams = field(default_factory=QCParams)
    pca: PCAParams = field(default_factory=PCAParams)
    chunk_variants: int = 8192
    seed: int = 0

    @classmethod
    def from_dict(cls, section: dict | None) -> ImportParams:
        d = dict(section or {})
        unknown = set(d) - PIPELINE_KEYS - {"qc", "pca", "chunk_variants", "seed"}
        if unknown:
            raise EndophenoError(f"genotypes: unknown parameter(s) {', '.join(sorted(unknown))}")
        chunk = int(d.get("chunk_variants", cls.chunk_variants))
        if chunk < 1:
            raise EndophenoError(f"genotypes.chunk_variants: {chunk} must be at least 1")
        return cls(QCParams.from_dict(d.get("qc")), PCAParams.from_dict(d.get("pca")), chunk, int(d.get("seed", cls.seed)))


@dataclass
class ImportReport:
    """What an import did: the store's size, QC removals per filter (in order), PCs, ID matching."""

    out: Path
    digest: str
    samples: int
    variants: int
    removed_samples: dict[str, int]
    removed_variants: dict[str, int]
    pcs: int
    pruned_variants: int
    matching: dict | None

    def summary(self) -> str:
        removed = ", ".join(f"{k} {v}" for k, v in {**self.removed_samples, **self.removed_variants}.items() if v) or "nothing"
        text = (f"genotypes: {self.samples} samples × {self.variants} variants in {self.out} (QC removed "
                f"{sum(self.removed_samples.values())} samples and {sum(self.removed_variants.values())} variants: {removed}); "
                f"{self.pcs} PCs from {self.pruned_variants} LD-pruned variants")
        if self.matching:
            m = self.matching
            text += (f"; IDs: {m['matched']} matched, {len(m['genotyped_not_imaged'])} genotyped not imaged, "
                     f"{len(m['imaged_not_genotyped'])} imaged not genotyped")
        return text


def import_genotypes(source, out: str | Path, params: ImportParams, *, subjects: list[str] | None = None,
                     subjects_from: str | None = None, workers: int | None = None, scheduler: str | None = None) -> ImportReport:
    """Import `source` (a `BedSource` or `PgenSource`) into the genotype store `out`, replacing it.

    Parameters
    ----------
    source : BedSource or PgenSource
    out : path of the store folder (e.g. ``stores/genotypes/<name>``).
    params : QC thresholds, PCA settings, chunking and seed.
    subjects : imaging subject IDs to match the samples' IIDs against (reported, never dropped);
        `subjects_from` names where they came from, for qc.json.
    workers, scheduler : dask threads for the PCA, or the address of a dask cluster (which must see
        the store's folder).
    """
    out = Path(out)
    files = _source_files(source)
    _check_sample_ids(source.samples, files[2])
    _check_replaceable(out)
    file_hashes = {p.suffix: layout.file_sha256(p) for p in files}
    digest = layout.digest(file_hashes, asdict(params))
    n_samples, n_variants = len(source.samples), len(source.variants)
    if not n_samples or not n_variants:
        raise InputError(source.path, f"has {n_samples} samples and {n_variants} variants: nothing to import")
    dtype = source.read(0, 1).dtype  # int8 hard calls or float32 dosages, as the source gives them
    log.info("importing %d samples × %d variants from %s", n_samples, n_variants, source.path)

    _remove_leftovers(out)
    tmp = out.with_name(f"{out.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        sample_rate, fractional = _sample_call_rates(source, params.chunk_variants)
        if dtype == np.float32 and not fractional and hasattr(source, "as_hard_calls"):
            # A .pgen is read as dosages; the first pass has seen every variant, none fractional: 1 byte a call.
            source, dtype = source.as_hard_calls(), np.dtype(np.int8)
        sample_reason = sample_filter(sample_rate, params.qc)
        keep = sample_reason == ""
        if not keep.any():
            raise EndophenoError(f"{source.path}: every sample has more than {params.qc.mind:.0%} missing calls "
                                 "(genotypes.qc.mind)")
        attrs = {"endopheno": {"kind": "genotype store", "format_version": layout.FORMAT_VERSION}, "digest": digest,
                 "sources": {str(p): file_hashes[p.suffix] for p in files}, "counted_allele": layout.COUNTED_ALLELE,
                 "missing": "NaN" if dtype == np.float32 else int(MISSING)}
        result = _variant_pass(source, tmp, keep, dtype, params, attrs)
        pcs, explained = _pcs(tmp, result, params, workers, scheduler)

        samples = _write_tables(tmp, source, sample_rate, sample_reason, result, pcs)
        matching = None
        if subjects is not None:
            matching = {"source": subjects_from, **match_ids(samples["iid"], subjects, source.samples["iid"][~keep])}
            _log_matching(matching)
        reason = result["reason"]
        report = ImportReport(out, digest, len(samples), int((reason == "").sum()),
                              _removed(sample_reason, ["mind"], params.qc), _removed(reason, ["geno", "hwe", "maf", "mac"], params.qc),
                              pcs.shape[1], len(result["pruned"]), matching)
        layout.write_json(tmp / layout.QC, _qc_json(report, params, attrs, n_samples, n_variants, explained))
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _write_tables(tmp: Path, source, sample_rate: np.ndarray, sample_reason: np.ndarray, result: dict,
                  pcs: np.ndarray) -> pd.DataFrame:
    """variants, samples and removed_* tables; returns the samples table."""
    keep, reason = sample_reason == "", result["reason"]
    pc_table = pd.DataFrame(pcs, columns=[f"pc{i + 1}" for i in range(pcs.shape[1])])
    samples = source.samples[keep].reset_index(drop=True).assign(call_rate=result["sample_call_rate"])
    samples = pd.concat([samples, pc_table], axis=1)
    variants = pd.concat([source.variants, result["stats"]], axis=1)
    kept = variants[reason == ""].reset_index(drop=True)
    kept["pca"] = np.isin(np.arange(len(kept)), result["pruned"])
    removed_variants = variants[reason != ""].assign(reason=reason[reason != ""])
    removed_samples = source.samples[~keep].assign(call_rate=sample_rate[~keep], reason=sample_reason[~keep])
    for table, name in ((kept, layout.VARIANTS), (samples, layout.SAMPLES), (removed_variants, layout.REMOVED_VARIANTS),
                        (removed_samples, layout.REMOVED_SAMPLES)):
        table.reset_index(drop=True).to_parquet(tmp / name, index=False)
    return samples


def _source_files(source) -> list[Path]:
    main = Path(source.path)
    if main.suffix not in SIDECARS:
        raise InputError(main, "not a PLINK source (.bed or .pgen); a genotype store is imported already")
    return [main, *(main.with_suffix(s) for s in SIDECARS[main.suffix])]


def _check_sample_ids(samples: pd.DataFrame, sample_file: Path) -> None:
    dup = samples["iid"][samples["iid"].duplicated()]
    if len(dup):
        raise InputError(sample_file, f"sample IID {dup.iloc[0]} appears more than once; IIDs must be unique "
                                      "(they are subject IDs)")


def _check_replaceable(out: Path) -> None:
    # The store is replaced wholesale: never do that to a folder that is not one (a mistyped --out).
    if out.exists() and any(out.iterdir()) and not (out / layout.QC).exists():
        raise InputError(out, "exists and is not a genotype store; refusing to replace it")


def _blocks(n: int, size: int, label: str):
    with progress(label) as bar:
        task = bar.add_task(label, total=n)
        for start in range(0, n, size):
            stop = min(start + size, n)
            yield start, stop
            bar.advance(task, stop - start)


def _sample_call_rates(source, chunk: int) -> tuple[np.ndarray, bool]:
    """Each sample's call rate over all variants, and whether any dosage is fractional."""
    n_variants = len(source.variants)
    on_y, male = sex_chromosome(source.variants["chrom"]) == "Y", source.samples["sex"].to_numpy() == 1
    missing = np.zeros(len(source.samples), np.int64)
    fractional = False
    for start, stop in _blocks(n_variants, chunk, "sample call rates"):
        block = source.read(start, stop)
        missing += counted_missing(missing_calls(block), on_y[start:stop], male)
        if block.dtype != np.int8 and not fractional:
            fractional = bool(np.any(np.abs(block - np.rint(block)) > 0))  # False for NaN
    expected = n_variants - on_y.sum() * ~male  # a non-male has no chrY call to miss
    return 1 - missing / np.maximum(expected, 1), fractional


class _ChunkWriter:
    """Appends rows to a Zarr array one whole chunk at a time (each chunk is encoded once)."""

    def __init__(self, array):
        self.array, self.rows, self.pending = array, 0, []

    @property
    def appended(self) -> int:
        """Rows added so far, written or pending."""
        return self.rows + sum(len(p) for p in self.pending)

    def add(self, rows: np.ndarray) -> None:
        self.pending.append(rows)
        chunk = self.array.chunks[0]
        if self.appended - self.rows >= chunk:
            data = np.concatenate(self.pending)
            full = len(data) // chunk * chunk
            self._write(data[:full])
            self.pending = [data[full:]]

    def close(self) -> None:
        if self.pending:
            self._write(np.concatenate(self.pending))
        self.array.resize((self.rows, self.array.shape[1]))

    def _write(self, data: np.ndarray) -> None:
        self.array[self.rows:self.rows + len(data)] = data
        self.rows += len(data)


def _variant_pass(source, tmp: Path, keep: np.ndarray, dtype: np.dtype, params: ImportParams, attrs: dict) -> dict:
    """Statistics and filters of every variant on the kept samples; kept variants written to the array,
    common ones LD-pruned. Returns stats, reasons, the store rows chosen for PCA and their frequencies,
    and the kept samples' call rates over the kept variants."""
    n_variants, n_kept = len(source.variants), int(keep.sum())
    array = layout.create_dosages(tmp / layout.DOSAGES, n_variants, n_kept, dtype, params.chunk_variants, attrs)
    writer, pruner = _ChunkWriter(array), LDPruner(params.pca.ld_window, params.pca.ld_r2)
    chrom = source.variants["chrom"].to_numpy()
    on_y, male = sex_chromosome(chrom) == "Y", source.samples["sex"].to_numpy()[keep] == 1
    stats, reasons, pruned, pruned_freq = [], [], [], []
    sample_missing, kept_y = np.zeros(n_kept, np.int64), 0
    for start, stop in _blocks(n_variants, params.chunk_variants, "variant QC and store"):
        block = source.read(start, stop)
        if not keep.all():
            block = block[:, keep]
        y = on_y[start:stop]
        if y.any():  # chrY: only males' calls count (PLINK 2); the others are stored missing
            block[np.ix_(y, ~male)] = MISSING if block.dtype == np.int8 else np.nan
        s = variant_stats(variant_counts(block), chrom[start:stop], np.where(y, male.sum(), n_kept))
        reason = variant_filter(s, params.qc)
        kept = reason == ""
        common = kept & (np.minimum(s["a1_freq"], 1 - s["a1_freq"]).to_numpy() >= params.pca.min_maf)
        freq = s["a1_freq"].to_numpy()[common]
        ld_kept = pruner.add(standardise(block[common], freq), chrom[start:stop][common])
        store_row = writer.appended + np.cumsum(kept) - 1
        pruned.append(store_row[common][ld_kept])
        pruned_freq.append(freq[ld_kept])
        rows = block[kept]
        writer.add(rows)
        sample_missing += counted_missing(missing_calls(rows), y[kept], male)
        kept_y += int(y[kept].sum())
        stats.append(s)
        reasons.append(reason)
    writer.close()
    reason = np.concatenate(reasons) if reasons else np.empty(0, object)
    if not (reason == "").any():
        raise EndophenoError(f"{source.path}: QC removed every variant (see the genotypes.qc thresholds)")
    log.info("variant QC kept %d of %d variants; LD pruning kept %d common ones", writer.rows, n_variants, sum(map(len, pruned)))
    return {"stats": pd.concat(stats, ignore_index=True), "reason": reason, "pruned": np.concatenate(pruned),
            "pruned_freq": np.concatenate(pruned_freq),
            "sample_call_rate": 1 - sample_missing / np.maximum(writer.rows - kept_y * ~male, 1)}


def _pcs(tmp: Path, result: dict, params: ImportParams, workers: int | None, scheduler: str | None):
    import dask
    import zarr

    array = zarr.open_array(str(tmp / layout.DOSAGES), mode="r")
    k = params.pca.pcs
    log.info("computing %d PCs of %d samples from %d LD-pruned variants (randomised SVD, seed %d)",
             k, array.shape[1], len(result["pruned"]), params.seed)
    if scheduler:
        from dask.distributed import Client

        context = Client(scheduler)
    else:
        context = dask.config.set(scheduler="threads", num_workers=workers or default_workers())
    with context:
        pcs, explained = genetic_pcs(array, result["pruned"], result["pruned_freq"], k, seed=params.seed,
                                     power_iterations=params.pca.power_iterations)
    if pcs.shape[1] < k:
        log.warning("only %d PCs computed (of %d asked): %d samples, %d pruned variants",
                    pcs.shape[1], k, array.shape[1], len(result["pruned"]))
    return pcs, explained


def _removed(reason: np.ndarray, names: list[str], qc: QCParams) -> dict[str, int]:
    """Removals per filter, in the order applied, for the filters that are on."""
    on = {"mind": qc.mind, "geno": qc.geno, "hwe": qc.hwe_p, "maf": qc.min_maf, "mac": qc.min_mac}
    return {name: int((reason == name).sum()) for name in names if on[name] is not None}


def _qc_json(report: ImportReport, params: ImportParams, attrs: dict, n_samples: int, n_variants: int, explained) -> dict:
    return {
        "format_version": layout.FORMAT_VERSION, "digest": report.digest, "sources": attrs["sources"],
        "thresholds": asdict(params.qc),
        "samples": {"input": n_samples, "removed": report.removed_samples, "kept": report.samples},
        "variants": {"input": n_variants, "removed": report.removed_variants, "kept": report.variants},
        "pca": {**asdict(params.pca), "seed": params.seed, "computed": report.pcs, "variants_used": report.pruned_variants,
                "explained_variance_ratio": [round(float(x), 6) for x in explained]},
        "chunk_variants": params.chunk_variants,
        "id_matching": report.matching,
    }


def _log_matching(m: dict) -> None:
    for key, what in (("genotyped_not_imaged", "genotyped samples without an imaging subject"),
                      ("imaged_not_genotyped", "imaging subjects without genotypes")):
        ids = m[key]
        if ids:
            more = f" (+{len(ids) - 10} more)" if len(ids) > 10 else ""
            log.info("%d %s: %s%s", len(ids), what, " ".join(ids[:10]), more)


def _remove_leftovers(out: Path) -> None:
    """What a crashed import left beside the store."""
    if out.parent.exists():
        for leftover in [*out.parent.glob(f"{out.name}.partial-*"), *out.parent.glob(f"{out.name}.old-*")]:
            shutil.rmtree(leftover, ignore_errors=True)


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f"{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
