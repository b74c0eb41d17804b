"""Genotype sources: one interface over PLINK 1 (.bed), PLINK 2 (.pgen) and the genotype store.

A source has a `samples` table (fid, iid, sex), a `variants` table (chrom, pos, id, allele1, allele2),
a `path`, and `read(start, stop)`, which returns the dosages of variants ``start:stop`` as a (variants × samples)
array: int8 hard calls with `MISSING` (-127) for a missing call, or float32 dosages with NaN. The
counted allele is `allele1`: the `.bim`'s fifth column, the `.pvar`'s ALT, as PLINK 2 counts by default.
`reader` is a small picklable object with the same `read`, for dask workers (no tables, no open files).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd

from endopheno.errors import InputError

MISSING = np.int8(-127)  # bed-reader's int8 missing value; kept in the store so that hard calls stay 1 byte
SAMPLE_COLUMNS = ["fid", "iid", "sex"]
VARIANT_COLUMNS = ["chrom", "pos", "id", "allele1", "allele2"]


def _need(path: Path) -> Path:
    if not path.is_file():
        raise InputError(path, "not found")
    return path


class BedSource:
    """PLINK 1 binary fileset ``PREFIX.bed/.bim/.fam``, read with bed-reader."""

    dosages = False

    def __init__(self, prefix: str | Path, num_threads: int | None = 1):
        prefix = Path(prefix)
        self.path = _need(prefix.with_name(prefix.name + ".bed"))
        fam = _read_table(_need(prefix.with_name(prefix.name + ".fam")), ["fid", "iid", "father", "mother", "sex", "pheno"])
        bim = _read_table(_need(prefix.with_name(prefix.name + ".bim")), ["chrom", "id", "cm", "pos", "allele1", "allele2"])
        self.samples = pd.DataFrame({"fid": fam.fid, "iid": fam.iid, "sex": _sex(fam.sex)})
        self.variants = _variant_table(bim)
        _check_bed_size(self.path, len(fam), len(bim))
        self.reader = BedReader(self.path, len(fam), len(bim), num_threads)
        self.reader.read(0, min(1, len(bim)))  # fail here, naming the file, if it is not a .bed

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.reader.read(start, stop)


class BedReader:
    def __init__(self, path: Path, samples: int, variants: int, num_threads: int | None = 1):
        self.path, self.samples, self.variants, self.num_threads = path, samples, variants, num_threads
        self._bed = None

    def __getstate__(self):
        return {**self.__dict__, "_bed": None}

    def read(self, start: int, stop: int) -> np.ndarray:
        from bed_reader import open_bed

        try:
            if self._bed is None:
                self._bed = open_bed(self.path, iid_count=self.samples, sid_count=self.variants,
                                     num_threads=self.num_threads)
            # bed-reader fills a samples × variants Fortran array; its transpose is variants × samples, C order.
            return self._bed.read(index=np.s_[:, start:stop], dtype="int8", order="F").T
        except Exception as e:  # bed-reader raises plain ValueErrors for a bad magic number or a short file
            raise InputError(self.path, f"not a readable PLINK 1 .bed file ({e})") from None


class PgenSource:
    """PLINK 2 fileset ``PREFIX.pgen/.pvar/.psam``, read with pgenlib as float32 dosages (hard calls are
    whole dosages): pgenlib cannot tell whether a file holds fractional dosages without reading all of it.
    `as_hard_calls()` reads 1-byte hard calls instead, for a caller that has seen every variant integral."""

    def __init__(self, prefix: str | Path):
        prefix = Path(prefix)
        self.path = _need(prefix.with_name(prefix.name + ".pgen"))
        psam = _read_header_table(_need(prefix.with_name(prefix.name + ".psam")))
        pvar = _read_header_table(_need(prefix.with_name(prefix.name + ".pvar")))
        iid = psam["IID"].astype(str)
        fid = psam["FID"].astype(str) if "FID" in psam else iid
        sex = _sex(psam.get("SEX", pd.Series("0", index=psam.index)))
        self.samples = pd.DataFrame({"fid": fid, "iid": iid, "sex": sex})
        if pvar["ALT"].astype(str).str.contains(",").any():
            bad = pvar.loc[pvar["ALT"].astype(str).str.contains(","), "ID"].iloc[0]
            raise InputError(prefix, f"variant {bad} is multi-allelic; split it first (plink2 --make-pgen --split-par or bcftools norm -m-)")
        self.variants = _variant_table(pd.DataFrame({
            "chrom": pvar["CHROM"], "pos": pvar["POS"], "id": pvar["ID"], "allele1": pvar["ALT"], "allele2": pvar["REF"]}))
        self.reader = PgenReader(self.path, len(self.samples))

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.reader.read(start, stop)

    def as_hard_calls(self) -> PgenSource:
        """The same fileset read as int8 hard calls (`MISSING` for a missing call)."""
        other = copy.copy(self)
        other.reader = PgenReader(self.path, len(self.samples), dosages=False)
        return other


class PgenReader:
    def __init__(self, path: Path, samples: int, dosages: bool = True):
        self.path, self.samples, self.dosages = path, samples, dosages
        self._pgen = None
        self._open()  # fail here, naming the file, if it is not a .pgen

    def __getstate__(self):
        return {**self.__dict__, "_pgen": None}

    def _open(self):
        import pgenlib

        if self._pgen is None:
            try:
                self._pgen = pgenlib.PgenReader(bytes(self.path), raw_sample_ct=self.samples)
            except Exception as e:
                raise InputError(self.path, f"not a readable PLINK 2 .pgen file ({e})") from None
        return self._pgen

    def read(self, start: int, stop: int) -> np.ndarray:
        n = self.samples
        if self.dosages:
            out = np.empty((stop - start, n), dtype=np.float32)
            self._open().read_dosages_range(start, stop, out, allele_idx=1)
            out[out < 0] = np.nan  # pgenlib writes -9 for a missing dosage
            return out
        out = np.empty((stop - start, n), dtype=np.int8)
        self._open().read_range(start, stop, out, allele_idx=1)
        out[out < 0] = MISSING
        return out


def _check_bed_size(path: Path, n_samples: int, n_variants: int) -> None:
    # bed-reader checks the size only when reading; a truncated file should fail here, with its name.
    expected = 3 + n_variants * ((n_samples + 3) // 4)  # magic bytes, then one byte per 4 samples per variant
    size = path.stat().st_size
    if size != expected:
        raise InputError(path, f"{size} bytes, but {n_samples} samples × {n_variants} variants need {expected} "
                               f"({'truncated' if size < expected else 'too long'}; do the .fam and .bim belong to it?)")


def open_source(bfile: str | Path | None = None, pfile: str | Path | None = None, store: str | Path | None = None):
    """Open exactly one of a PLINK 1 prefix, a PLINK 2 prefix or a genotype store folder."""
    given = [x for x in (bfile, pfile, store) if x is not None]
    if len(given) != 1:
        raise InputError("genotypes", "give exactly one of --bfile PREFIX, --pfile PREFIX or a genotype store")
    if bfile is not None:
        return BedSource(bfile)
    if pfile is not None:
        return PgenSource(pfile)
    from endopheno.genotypes.store import StoreSource

    return StoreSource(store)


def _sex(codes: pd.Series) -> pd.Series:
    """PLINK's sex codes: 1/M/m male (1), 2/F/f female (2), anything else (0, NA, U, ...) unknown (0)."""
    return codes.astype(str).map({"1": 1, "M": 1, "m": 1, "2": 2, "F": 2, "f": 2}).fillna(0).astype(np.int8)


def _read_table(path: Path, names: list[str]) -> pd.DataFrame:
    try:
        # keep_default_na=False: "NA" (a missing .fam phenotype) is a field, not a missing column.
        table = pd.read_csv(path, sep=r"\s+", header=None, names=names, dtype=str, engine="c",
                            keep_default_na=False)
    except Exception as e:
        raise InputError(path, f"cannot be parsed ({e})") from None
    short = table.isna() | (table == "")  # a line's absent fields (whitespace-split fields are never empty)
    if short.any(axis=None):
        row = int(short.any(axis=1).to_numpy().argmax())
        raise InputError(path, f"line {row + 1} has fewer than {len(names)} columns")
    return table


def _read_header_table(path: Path) -> pd.DataFrame:
    """A .pvar/.psam: '##' meta lines, then a '#'-prefixed header line."""
    with open(path) as f:
        skip = 0
        for line in f:
            if not line.startswith("##"):
                break
            skip += 1
    table = pd.read_csv(path, sep="\t", skiprows=skip, dtype=str)
    table.columns = [c.lstrip("#") for c in table.columns]
    return table


def _variant_table(t: pd.DataFrame) -> pd.DataFrame:
    pos = pd.to_numeric(t["pos"], errors="coerce")
    if pos.isna().any():
        bad = t["id"][pos.isna()].iloc[0]
        raise InputError(f"variant {bad}", "position is not an integer")
    return pd.DataFrame({"chrom": t["chrom"].astype(str).to_numpy(), "pos": pos.astype(np.int64).to_numpy(),
                         "id": t["id"].astype(str).to_numpy(), "allele1": t["allele1"].astype(str).to_numpy(),
                         "allele2": t["allele2"].astype(str).to_numpy()})
