"""A GWAS run: phenotype groups, variant blocks streamed through dask, results written as Parquet.

``OUT/results/part-NNNNN.parquet`` holds one row per variant × phenotype of one block of variants
(phenotype-major inside a file, so a query on one phenotype reads contiguous row groups); DuckDB and
pyarrow read the folder as one table. The run writes into ``OUT/.partial`` and renames it into place
at the end, so a crash never leaves half a result where a finished one is expected.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits

from endopheno.errors import EndophenoError
from endopheno.genotypes.qc import missing_calls, sex_chromosome
from endopheno.gwas.linear import (Laps, PhenotypeGroup, associate_block, phenotype_groups,
                                   sex_chromosome_model)
from endopheno.gwas.phenotypes import Aligned
from endopheno.parallel import default_workers, map_items

# `variant` is the row of the variant in the source's variant table: IDs need not be unique ('.' in a .pvar).
RESULT_COLUMNS = ["phenotype", "chrom", "pos", "id", "variant", "a1", "a2", "a1_freq", "n", "beta", "se", "t_stat",
                  "p", "log10_p", "reason"]


@dataclass
class GwasOptions:
    """Knobs of the association scan (the `gwas` section of params.yaml)."""

    block_variants: int = 1024      # variants per task: memory is bounded by block × samples × threads
    missing: str = "exact"          # exact (drop a sample with a missing call, like PLINK 2) | mean (impute)
    precision: str = "float64"      # float32: the big product in single precision (GPU), side terms float64
    min_maf: float = 0.0            # on the samples of each phenotype group
    min_mac: float = 0.0
    device: str = "cpu"             # cpu | cuda | cuda:N | auto
    workers: int | None = None      # threads of the local dask cluster (default: cores + 1); 1 = no cluster
    scheduler: str | None = None    # address of an existing dask scheduler

    def __post_init__(self):
        if self.missing not in ("exact", "mean"):
            raise EndophenoError(f"gwas: missing must be 'exact' or 'mean', not {self.missing!r}")
        if self.precision not in ("float64", "float32"):
            raise EndophenoError(f"gwas: precision must be 'float64' or 'float32', not {self.precision!r}")


@dataclass
class ScanSummary:
    phenotypes: list[str]
    variants: int
    tests: int = 0
    seconds: float = 0.0
    untested: dict[str, int] = field(default_factory=dict)      # reason -> variant × phenotype count
    filtered: int = 0                                           # variant × phenotype pairs below min-maf/mac
    samples: dict[str, int] = field(default_factory=dict)       # phenotype -> samples of its group
    unmatched: dict[str, list[str]] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)     # phenotype -> why its group was not tested
    phase_seconds: dict[str, float] = field(default_factory=dict)  # summed over workers

    @property
    def tests_per_second(self) -> float:
        return self.tests / self.seconds if self.seconds else float("nan")


def scan(source, phenotypes: Aligned, covariates: Aligned | None, out: str | Path,
         options: GwasOptions | None = None) -> ScanSummary:
    """Test every phenotype against every variant of `source`; write ``OUT/results/``."""
    options = options or GwasOptions()
    out = Path(out)
    cov = covariates.values if covariates is not None else np.empty((len(source.samples), 0))
    left_out: dict[str, str] = {}
    groups = phenotype_groups(phenotypes.values, cov, phenotypes.names, covariates.names if covariates else None,
                              (covariates.source or None) if covariates else None, left_out)
    kind = sex_chromosome(source.variants["chrom"])
    groups_of = {"": groups, **_sex_chromosome_groups(set(kind) - {""}, source.samples, phenotypes, covariates,
                                                      left_out)}
    if not any(groups_of[k] for k in set(kind) or {""}):
        raise EndophenoError("gwas: no phenotype can be tested (" + "; ".join(f"{k}: {v}" for k, v in
                                                                            list(left_out.items())[:3]) + ")")
    summary = ScanSummary(phenotypes=phenotypes.names, variants=len(source.variants), left_out=left_out,
                          samples={name: len(g.samples) for g in groups for name in g.names},
                          unmatched={"phenotypes": phenotypes.unmatched,
                                     "covariates": covariates.unmatched if covariates else []})
    partial_dir = out / ".partial"
    shutil.rmtree(partial_dir, ignore_errors=True)
    (partial_dir / "results").mkdir(parents=True)

    m = len(source.variants)
    blocks = _blocks(kind, options.block_variants)
    task = partial(_scan_block, variants=source.variants, folder=str(partial_dir / "results"))
    shared = {"reader": getattr(source, "reader", source), "groups": groups_of, "options": options}
    # Local workers are threads (the kernel's numpy, BLAS and Arrow calls release the GIL), each with a
    # single-threaded BLAS: blocks then overlap their reading, decoding and writing with the products.
    # One thread more than cores keeps every core busy while a thread runs Python glue under the GIL
    # (measured: 5% faster than one per core on 2 cores).
    workers = 1 if _torch_device(options.device) != "cpu" else (options.workers or default_workers() + 1)
    t0 = time.perf_counter()
    with threadpool_limits(1 if (workers or 2) > 1 else None, user_api="blas"):
        for block, result in map_items(task, blocks, workers=workers, scheduler=options.scheduler, processes=False,
                                       label=f"gwas: {len(phenotypes.names)} phenotypes × {m} variants", shared=shared):
            if isinstance(result, Exception):
                raise EndophenoError(f"gwas: variants {block[1]}–{block[2]} failed: {result}")
            summary.tests += result["tests"]
            summary.filtered += result["filtered"]
            for phase, seconds in result["seconds"].items():
                summary.phase_seconds[phase] = summary.phase_seconds.get(phase, 0.0) + seconds
            for reason, count in result["untested"].items():
                summary.untested[reason] = summary.untested.get(reason, 0) + count
    summary.seconds = time.perf_counter() - t0
    (partial_dir / "scan.json").write_text(json.dumps({**asdict(summary), "options": asdict(options)}, indent=1))
    # The previous results are moved aside only once the new ones are complete, then swapped in.
    stale = partial_dir / "stale"
    stale.mkdir()
    for name in ("results", "scan.json"):
        if (out / name).exists():
            (out / name).replace(stale / name)
        (partial_dir / name).replace(out / name)
    shutil.rmtree(partial_dir)
    return summary


def _blocks(kind: np.ndarray, step: int) -> list[tuple[int, int, int, str]]:
    """(index, start, stop, kind) of blocks of at most `step` variants; a block never spans two kinds of
    chromosome ("" autosomal, "X", "Y"), since each kind has its own phenotype groups."""
    cuts = [0, *(np.flatnonzero(kind[1:] != kind[:-1]) + 1).tolist(), len(kind)]
    spans = [(start, min(start + step, stop), str(kind[first]))
             for first, stop in zip(cuts[:-1], cuts[1:]) for start in range(first, stop, step)]
    return [(i, *span) for i, span in enumerate(spans)]


def _sex_chromosome_groups(kinds: set[str], samples, phenotypes: Aligned, covariates: Aligned | None,
                           left_out: dict[str, str]) -> dict[str, list[PhenotypeGroup]]:
    """The phenotype groups of chrX and chrY variants (see `sex_chromosome_model`). A phenotype that cannot
    be tested there is recorded in `left_out` as 'NAME on chrX' (or chrY)."""
    sex = samples["sex"].to_numpy() if "sex" in samples else np.zeros(len(samples))
    cov = covariates.values if covariates is not None else np.empty((len(samples), 0))
    out = {}
    for kind in sorted(kinds):
        c, names, usable, _ = sex_chromosome_model(kind, sex, cov, covariates.names if covariates is not None else [])
        missed: dict[str, str] = {}
        out[kind] = phenotype_groups(np.where(usable[:, None], phenotypes.values, np.nan), c, phenotypes.names,
                                     names, (covariates.source or None) if covariates is not None else None, missed)
        left_out.update({f"{name} on chr{kind}": reason for name, reason in missed.items()})
    return out


def _scan_block(block, *, reader, groups: dict[str, list[PhenotypeGroup]], options: GwasOptions, variants,
                folder: str) -> dict:
    index, start, stop, kind = block
    groups = groups[kind]
    timer: dict[str, float] = {}
    lap = Laps(timer)
    dosages = reader.read(start, stop)
    if kind == "Y":  # haploid: a male's call counts 0 or 1 copies (PLINK 2), so halve it (in float)
        dosages = np.where(missing_calls(dosages), np.nan, dosages.astype(np.float32)) / np.float32(2)
    lap("read")
    product = _torch_product(options.device) if _torch_device(options.device) != "cpu" else None
    tables, counts = [], {"tests": 0, "filtered": 0, "untested": {}, "seconds": timer}
    v = variants.iloc[start:stop]
    for group in groups:
        r = associate_block(dosages, group, missing=options.missing, precision=options.precision, product=product,
                            laps=lap)
        alleles = 2 * r.n
        if kind == "Y":  # haploid: one allele per call, so the kernel's Σg / 2n is half the frequency
            alleles, r.a1_freq = r.n, 2 * r.a1_freq
        mac = np.minimum(alleles * r.a1_freq, alleles * (1 - r.a1_freq))
        keep = ~((np.minimum(r.a1_freq, 1 - r.a1_freq) < options.min_maf) | (mac < options.min_mac))
        counts["filtered"] += int((~keep).sum()) * len(r.names)
        tested = keep & (r.reason == "")
        counts["tests"] += int(tested.sum()) * len(r.names)
        for reason in set(r.reason[keep & ~tested]):
            counts["untested"][reason] = counts["untested"].get(reason, 0) + int((r.reason[keep] == reason).sum()) * len(r.names)
        tables.append(_long_table(r, v, keep, start))
        lap("write")
    if not tables:  # no phenotype testable on this block's chromosome (recorded in the summary's left_out)
        return counts
    # Dictionary pages only for the repeated strings, lz4, and min/max statistics only where queries
    # filter: 3× faster to write than pyarrow's defaults (measured on 262k rows), and no larger.
    pq.write_table(pa.concat_tables(tables), f"{folder}/part-{index:05d}.parquet", compression="lz4",
                   use_dictionary=["phenotype", "chrom", "id", "a1", "a2", "reason"],
                   write_statistics=["phenotype", "chrom", "pos", "p", "log10_p"])
    lap("write")
    return counts


def _long_table(r, v, keep: np.ndarray, start: int) -> pa.Table:
    """One row per (phenotype, variant) of the block of variants from row `start`: variant columns repeat
    per phenotype as dictionary arrays."""
    rows = np.flatnonzero(keep)
    p = len(r.names)
    variant_index = pa.array(np.tile(np.arange(len(rows), dtype=np.int32), p))

    def repeat(values) -> pa.Array:
        return pa.DictionaryArray.from_arrays(variant_index, pa.array(np.asarray(values)[rows], pa.string()))

    def per_phenotype(values: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(values[rows].T).ravel()

    reason = np.asarray(r.reason[rows], dtype=object)
    reason = pa.array(np.tile(reason, p), pa.string(), mask=np.tile(reason == "", p))
    return pa.table({
        "phenotype": pa.DictionaryArray.from_arrays(pa.array(np.repeat(np.arange(p, dtype=np.int32), len(rows))),
                                                    pa.array(r.names, pa.string())),
        "chrom": repeat(v["chrom"]), "pos": np.tile(v["pos"].to_numpy()[rows], p), "id": repeat(v["id"]),
        "variant": np.tile((start + rows).astype(np.int64), p),
        "a1": repeat(v["allele1"]), "a2": repeat(v["allele2"]),
        "a1_freq": np.tile(r.a1_freq[rows], p), "n": np.tile(r.n[rows], p),
        "beta": per_phenotype(r.beta), "se": per_phenotype(r.se), "t_stat": per_phenotype(r.t_stat),
        "p": per_phenotype(r.p), "log10_p": per_phenotype(r.log10_p), "reason": reason,
    })


def _torch_device(device: str) -> str:
    if device == "auto":
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            return "cpu"
    return device


@functools.lru_cache(maxsize=None)
def _torch_product(device: str):
    """The big product on a torch device; the phenotype matrix stays resident there across blocks."""
    import torch

    device = _torch_device(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EndophenoError(f"gwas: device {device} requested but torch sees no CUDA device")
    resident: dict[int, tuple[np.ndarray, torch.Tensor]] = {}  # id(operand) -> (operand kept alive, its copy)

    def product(g: np.ndarray, y: np.ndarray) -> np.ndarray:
        if id(y) not in resident:
            resident[id(y)] = (y, torch.from_numpy(np.ascontiguousarray(y)).to(device))
        return (torch.from_numpy(g).to(device) @ resident[id(y)][1]).cpu().numpy()

    return product
