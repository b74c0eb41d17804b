"""The genotype store's layout, and `StoreSource`, which reads it like a PLINK source.

    stores/genotypes/<name>/
      dosages.zarr              (variants × samples) int8 hard calls, MISSING = -127 (or float32 dosages,
                                NaN); chunked along variants only; attrs: sources, counted allele, digest
      variants.parquet          chrom, pos, id, allele1 (counted), allele2, a1_freq, mac, call_rate, hwe_p,
                                pca (used for the PCs: common and LD-pruned)
      samples.parquet           fid, iid, sex, call_rate, pc1..pcK
      removed_variants.parquet  every variant QC removed: its table row, statistics and `reason`
      removed_samples.parquet   every sample QC removed: fid, iid, sex, call_rate, `reason`
      qc.json                   thresholds, what each filter removed (in order), ID matching, PCA, digest

Row i of variants.parquet is row i of the array, row j of samples.parquet its column j. Only kept
variants and samples are in the array; statistics are computed on them (call rates of the store itself).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from endopheno.errors import InputError

FORMAT_VERSION = 1
DOSAGES, VARIANTS, SAMPLES = "dosages.zarr", "variants.parquet", "samples.parquet"
REMOVED_VARIANTS, REMOVED_SAMPLES, QC = "removed_variants.parquet", "removed_samples.parquet", "qc.json"
COUNTED_ALLELE = ("values count allele1 of variants.parquet: the .bim's fifth column or the .pvar's ALT, "
                  "the allele PLINK 2 counts by default")


class StoreSource:
    """A genotype store read like `BedSource`: `samples` (with call_rate and pc1..pcK), `variants`,
    `path`, `digest`, and ``read(start, stop)`` -> (variants × samples) int8 hard calls (`MISSING` for
    missing) or float32 dosages (NaN). `reader` is the picklable part that reads, for dask workers."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        for name in (DOSAGES, VARIANTS, SAMPLES):
            if not (self.path / name).exists():
                raise InputError(self.path, f"not a genotype store: no {name} (run `endopheno genotypes import`)")
        self.samples = pd.read_parquet(self.path / SAMPLES)
        self.variants = pd.read_parquet(self.path / VARIANTS)
        self.reader = StoreReader(self.path / DOSAGES)
        self.digest = self.reader.digest

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.reader.read(start, stop)


class StoreReader:
    """Reads rows of the dosage array. The last decoded chunk is kept, so streaming in blocks smaller
    than a chunk decodes each chunk once (4x faster at 1000-variant blocks of 8192-variant chunks)."""

    def __init__(self, path: Path):
        self.path = path
        self._open()

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.path = state["path"]
        self._open()

    def _open(self) -> None:
        import zarr

        self._array = zarr.open_array(str(self.path), mode="r")
        self.digest = str(self._array.attrs["digest"])
        self._cached: tuple[int, np.ndarray] = (-1, np.empty(0))

    def read(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, self._array.shape[0])
        if stop <= start:
            return np.empty((0, self._array.shape[1]), dtype=self._array.dtype)
        c = self._array.chunks[0]
        parts = [self._decoded(k)[max(start - k * c, 0):stop - k * c] for k in range(start // c, (stop - 1) // c + 1)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()  # a copy: callers may write in place

    def _decoded(self, k: int) -> np.ndarray:
        cached = self._cached  # one read of the attribute: another thread may replace it meanwhile
        if cached[0] != k:
            c = self._array.chunks[0]
            cached = (k, self._array[k * c:(k + 1) * c])
            self._cached = cached
        return cached[1]


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def digest(file_hashes: dict[str, str], params: dict) -> str:
    """sha256 of the format version, the source files' content hashes (keyed by extension, so that a
    moved or renamed file set keeps its digest) and the parameters that shape the store."""
    payload = {"format_version": FORMAT_VERSION, "sources": dict(sorted(file_hashes.items())), "params": params}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def create_dosages(path: Path, n_variants: int, n_samples: int, dtype: np.dtype, chunk_variants: int, attrs: dict):
    """The Zarr array of dosages (both sizes > 0), chunked along variants only. Blosc lz4 with bit-shuffling: hard calls
    take 2 of 8 bits, so it stores them ~6x smaller than raw and decodes faster than zstd (measured on
    the phantom: 6 MB for 90k × 400 calls, whole store read in 0.05 s)."""
    import zarr
    from zarr.codecs import BloscCodec

    return zarr.create_array(
        str(path), shape=(n_variants, n_samples), dtype=dtype, chunks=(min(chunk_variants, n_variants), n_samples),
        compressors=[BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")],
        fill_value=np.nan if dtype == np.float32 else int(-127), dimension_names=("variant", "sample"),
        attributes=attrs, zarr_format=3,
    )


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
