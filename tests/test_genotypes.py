"""The genotype store: QC that agrees with plink2, every filter removing what was planted (and saying
so), .bed and .pgen giving the same store, clear errors for bad files, atomic replacement, ID matching
against the imaging subjects, and PCs that separate two populations."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from bed_reader import open_bed, to_bed

from endopheno.errors import InputError
from endopheno.genotypes.ids import imaging_subjects
from endopheno.genotypes.importer import ImportParams, import_genotypes
from endopheno.genotypes.pca import LDPruner, PCAParams
from endopheno.genotypes.qc import QCParams
from endopheno.genotypes.sources import MISSING, BedSource, PgenSource
from endopheno.genotypes.store import StoreSource

from conftest import cli

NO_QC = QCParams(mind=None, geno=None, hwe_p=None, min_maf=None, min_mac=None)
PLINK2 = shutil.which("plink2")
needs_plink2 = pytest.mark.skipif(PLINK2 is None, reason="plink2 is not installed (.ci/run installs it)")


def write_bed(prefix: Path, calls: np.ndarray) -> Path:
    """Write (variants × samples) allele1 counts, NaN = missing, as PREFIX.bed/.bim/.fam (2 chromosomes)."""
    m, n = calls.shape
    iids = [f"s{j:03d}" for j in range(n)]
    chrom = np.repeat(["1", "2"], [m // 2, m - m // 2])
    prefix.parent.mkdir(parents=True, exist_ok=True)
    to_bed(f"{prefix}.bed", calls.T.astype(np.float32), count_A1=True, properties={
        "fid": iids, "iid": iids, "sex": np.tile([1, 2], n)[:n], "sid": [f"v{i:03d}" for i in range(m)],
        "chromosome": chrom, "bp_position": np.arange(m) * 1000 + 1, "allele_1": ["A"] * m, "allele_2": ["G"] * m})
    return prefix


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """200 samples × 400 variants in Hardy-Weinberg equilibrium, 1% missing calls, with planted failures."""
    rng = np.random.default_rng(0)
    m, n = 400, 200
    freq = rng.uniform(0.1, 0.5, m)
    calls = rng.binomial(2, freq[:, None], (m, n)).astype(np.float64)
    calls[rng.random((m, n)) < 0.01] = np.nan
    expect = {"mind": [0, 1, 2], "geno": [10, 11, 12, 13, 14, 50], "hwe": [20, 21, 22, 23, 24], "rare": [30, 31, 32, 33, 34],
              "monomorphic": [40, 41, 42, 43, 44]}
    calls[:, :3][rng.random((m, 3)) < 0.3] = np.nan             # three samples with ~30% missing calls
    calls[:, 3][rng.random(m) < 0.05] = np.nan                  # one with ~6%: kept
    calls[10:15][rng.random((5, n)) < 0.25] = np.nan            # variants with ~25% missing calls
    calls[20:25] = 1                                            # every sample heterozygous: far from HWE
    calls[30:35] = 0
    calls[30:35, 10] = 1                                        # one copy of allele1 among 400: MAF 0.0025
    calls[40:45] = 0                                            # monomorphic
    calls[50] = 1
    calls[50, rng.random(n) < 0.3] = np.nan                     # fails both geno and HWE: counted as geno
    prefix = write_bed(tmp_path_factory.mktemp("planted") / "planted", calls)
    return prefix, calls, expect


def _import(prefix, out, qc=QCParams(), chunk=8192):
    return import_genotypes(BedSource(prefix), out, ImportParams(qc=qc, chunk_variants=chunk, pca=PCAParams(pcs=3)))


def _plink(*args, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([PLINK2, *args, "--threads", "1", "--out", str(out)], check=True, capture_output=True)
    return out


def _table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t").rename(columns=lambda c: c.lstrip("#"))


def _ids(rows) -> set[str]:
    return {f"v{i:03d}" for i in rows}


def test_filters_remove_what_was_planted_and_say_so(planted, tmp_path):
    prefix, _, expect = planted
    report = _import(prefix, tmp_path / "store")
    store = tmp_path / "store"
    qc = json.loads((store / "qc.json").read_text())
    removed_v = pd.read_parquet(store / "removed_variants.parquet")
    removed_s = pd.read_parquet(store / "removed_samples.parquet")
    assert set(removed_s["iid"]) == {f"s{j:03d}" for j in expect["mind"]} and set(removed_s["reason"]) == {"mind"}
    assert (removed_s["call_rate"] < 0.9).all()
    by_reason = removed_v.groupby("reason")["id"].apply(set).to_dict()
    assert by_reason == {"geno": _ids(expect["geno"]), "hwe": _ids(expect["hwe"]), "maf": _ids(expect["rare"] + expect["monomorphic"])}
    # Counted in PLINK 2's order, every filter listed, and the tables add up.
    assert list(qc["variants"]["removed"]) == ["geno", "hwe", "maf", "mac"]
    assert qc["variants"]["removed"] == {"geno": 6, "hwe": 5, "maf": 10, "mac": 0} == report.removed_variants
    assert qc["samples"] == {"input": 200, "removed": {"mind": 3}, "kept": 197}
    assert qc["variants"]["kept"] == 400 - 21 == len(pd.read_parquet(store / "variants.parquet"))
    assert qc["thresholds"] == {"mind": 0.1, "geno": 0.1, "hwe_p": 1e-6, "min_maf": 0.01, "min_mac": 1}

    # Without a MAF filter the minor allele count filter takes the rare and monomorphic variants.
    _import(prefix, tmp_path / "mac", qc=QCParams(min_maf=None, min_mac=2))
    removed = pd.read_parquet(tmp_path / "mac" / "removed_variants.parquet")
    assert set(removed.loc[removed["reason"] == "mac", "id"]) == _ids(expect["rare"] + expect["monomorphic"])


def test_store_holds_the_kept_calls_in_table_order(planted, tmp_path):
    prefix, calls, expect = planted
    _import(prefix, tmp_path / "store", chunk=64)  # several chunks, and blocks that straddle them
    removed = set(sum((expect[k] for k in ("geno", "hwe", "rare", "monomorphic")), []))
    rows = [i for i in range(calls.shape[0]) if i not in removed]
    truth = calls[rows][:, 3:]
    truth = np.where(np.isnan(truth), MISSING, truth).astype(np.int8)
    arr = zarr.open_array(str(tmp_path / "store" / "dosages.zarr"), mode="r")
    assert arr.dtype == np.int8 and arr.chunks == (64, 197) and np.array_equal(arr[:], truth)
    source = StoreSource(tmp_path / "store")
    assert list(source.variants["id"]) == [f"v{i:03d}" for i in rows]
    assert list(source.samples["iid"]) == [f"s{j:03d}" for j in range(3, 200)]
    assert list(source.samples.columns[:5]) == ["fid", "iid", "sex", "call_rate", "pc1"]
    for start, stop in [(0, 10), (60, 70), (0, 379), (100, 260), (370, 500), (5, 5)]:
        assert np.array_equal(source.read(start, stop), truth[start:stop])
    block = source.read(60, 70)
    block[:] = 0  # a caller may write into what it read: the next read is unaffected
    assert np.array_equal(source.read(60, 70), truth[60:70])
    assert len(source.digest) == 64 and source.digest == arr.attrs["digest"]


@needs_plink2
def test_statistics_agree_with_plink2(planted, tmp_path):
    prefix, _, _ = planted
    _import(prefix, tmp_path / "store", qc=NO_QC)
    ours = pd.read_parquet(tmp_path / "store" / "variants.parquet")
    samples = pd.read_parquet(tmp_path / "store" / "samples.parquet")
    p = _plink("--bfile", str(prefix), "--freq", "--missing", "--hardy", out=tmp_path / "plink")
    freq, vmiss, smiss, hardy = (_table(p.with_suffix(s)) for s in (".afreq", ".vmiss", ".smiss", ".hardy"))
    assert list(freq["ID"]) == list(ours["id"]) == list(hardy["ID"])
    assert (freq["ALT"] == ours["allele1"]).all()  # the counted allele is the one plink2 counts
    np.testing.assert_allclose(ours["a1_freq"], freq["ALT_FREQS"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ours["call_rate"], 1 - vmiss["F_MISS"], rtol=1e-5)
    np.testing.assert_allclose(ours["mac"], np.minimum(freq["ALT_FREQS"], 1 - freq["ALT_FREQS"]) * freq["OBS_CT"], atol=1e-3)
    np.testing.assert_allclose(ours["hwe_p"], hardy["P"], rtol=1e-5)
    assert hardy["P"].min() < 1e-50  # the planted all-heterozygous variants are in the comparison
    np.testing.assert_allclose(samples["call_rate"], 1 - smiss["F_MISS"], rtol=1e-5)


@needs_plink2
def test_qc_keeps_what_plink2_keeps(planted, tmp_path):
    prefix, _, _ = planted
    _import(prefix, tmp_path / "store")
    variants = pd.read_parquet(tmp_path / "store" / "variants.parquet")
    samples = pd.read_parquet(tmp_path / "store" / "samples.parquet")
    qc = json.loads((tmp_path / "store" / "qc.json").read_text())
    p = _plink("--bfile", str(prefix), "--mind", "0.1", "--geno", "0.1", "--hwe", "1e-6", "--maf", "0.01", "--mac", "1",
               "--freq", "--write-snplist", "--write-samples", out=tmp_path / "plink")
    assert list(variants["id"]) == p.with_suffix(".snplist").read_text().split()
    assert list(samples["iid"]) == list(_table(p.with_suffix(".id"))["IID"])
    log = p.with_suffix(".log").read_text()
    removed = {name: int(re.search(pattern, log).group(1)) for name, pattern in [
        ("mind", r"(\d+) samples? removed due to missing genotype data"), ("geno", r"--geno: (\d+) variants? removed"),
        ("hwe", r"--hwe: (\d+) variants? removed"), ("maf", r"(\d+) variants? removed due to allele frequency")]}
    ours = {**qc["samples"]["removed"], **qc["variants"]["removed"]}
    assert removed == {"mind": ours["mind"], "geno": ours["geno"], "hwe": ours["hwe"], "maf": ours["maf"] + ours["mac"]}
    # plink2 reports frequencies on the kept samples before its variant filters: compare the kept ones.
    variants = pd.read_parquet(tmp_path / "store" / "variants.parquet")
    freq = _table(p.with_suffix(".afreq")).set_index("ID").loc[variants["id"]]
    np.testing.assert_allclose(variants["a1_freq"], freq["ALT_FREQS"], rtol=1e-5)
    # The stored call rates are those of the store itself: plink2 on the kept samples and variants.
    p = _plink("--bfile", str(prefix), "--keep", str(p.with_suffix(".id")), "--extract", str(p.with_suffix(".snplist")),
               "--missing", "--hardy", out=tmp_path / "kept")
    vmiss, smiss, hardy = (_table(p.with_suffix(s)) for s in (".vmiss", ".smiss", ".hardy"))
    np.testing.assert_allclose(variants["call_rate"], 1 - vmiss["F_MISS"], rtol=1e-5)
    np.testing.assert_allclose(variants["hwe_p"], hardy["P"], rtol=1e-5)
    np.testing.assert_allclose(samples["call_rate"], 1 - smiss["F_MISS"], rtol=1e-5)


@needs_plink2
def test_bed_and_pgen_give_the_same_store(planted, tmp_path):
    prefix, calls, _ = planted
    pfile = _plink("--bfile", str(prefix), "--make-pgen", out=tmp_path / "pgen" / "planted")
    params = ImportParams(chunk_variants=128, pca=PCAParams(pcs=4))
    a = import_genotypes(BedSource(prefix), tmp_path / "from_bed", params)
    b = import_genotypes(PgenSource(pfile), tmp_path / "from_pgen", params)
    assert (a.samples, a.variants, a.pcs) == (b.samples, b.variants, b.pcs) == (197, 379, 4)
    for name in ("variants.parquet", "samples.parquet", "removed_variants.parquet", "removed_samples.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "from_bed" / name), pd.read_parquet(tmp_path / "from_pgen" / name))
    x, y = (zarr.open_array(str(tmp_path / d / "dosages.zarr"), mode="r") for d in ("from_bed", "from_pgen"))
    assert x.dtype == y.dtype == np.int8 and np.array_equal(x[:], y[:])
    # The store's calls are the .bed's, read by bed-reader on its own.
    bed = open_bed(f"{prefix}.bed")
    kept = np.isin(bed.sid, StoreSource(tmp_path / "from_bed").variants["id"])
    assert np.array_equal(x[:], bed.read(dtype="int8").T[kept][:, 3:])
    qa, qb = (json.loads((tmp_path / d / "qc.json").read_text()) for d in ("from_bed", "from_pgen"))
    assert qa.pop("digest") != qb.pop("digest") and qa.pop("sources") != qb.pop("sources")
    assert qa == qb


def _dosage_pgen(tmp_path: Path, dosage: np.ndarray) -> Path:
    """A .pgen of these (variants × samples) dosages (NaN = missing), made by plink2 --import-dosage."""
    m, n = dosage.shape
    lines = ["SNP A1 A2 " + " ".join(f"s{j} s{j}" for j in range(n))]
    lines += [f"v{i} A G " + " ".join("NA" if np.isnan(x) else f"{x}" for x in row) for i, row in enumerate(dosage)]
    (tmp_path / "d.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "d.fam").write_text("".join(f"s{j} s{j} 0 0 1 -9\n" for j in range(n)))
    (tmp_path / "d.map").write_text("".join(f"1 v{i} 0 {1000 * i + 1}\n" for i in range(m)))
    return _plink("--import-dosage", str(tmp_path / "d.txt"), "format=1", "--psam", str(tmp_path / "d.fam"), "--map",
                  str(tmp_path / "d.map"), "--make-pgen", out=tmp_path / "dp")


@needs_plink2
def test_fractional_dosages_after_the_first_thousand_variants_are_kept(tmp_path):
    """Only variant 1000 of 1001 holds fractional dosages: the store keeps them, and so does a direct read."""
    rng = np.random.default_rng(6)
    dosage = rng.binomial(2, 0.4, (1001, 10)).astype(float)
    dosage[1000] = [0.25, 1.5, 0.75, 1.0, 2.0, 0.5, 1.25, 0.0, 1.75, 0.125]
    pfile = _dosage_pgen(tmp_path, dosage)
    np.testing.assert_allclose(PgenSource(pfile).read(1000, 1001)[0], dosage[1000], atol=1e-4)
    import_genotypes(PgenSource(pfile), tmp_path / "store", ImportParams(qc=NO_QC, pca=PCAParams(pcs=1)))
    arr = zarr.open_array(str(tmp_path / "store" / "dosages.zarr"), mode="r")
    assert arr.dtype == np.float32
    np.testing.assert_allclose(arr[:], dosage, atol=1e-4)


@needs_plink2
def test_dosages_are_stored_as_float_and_agree_with_plink2(tmp_path):
    rng = np.random.default_rng(4)
    m, n = 40, 60
    dosage = rng.uniform(0, 2, (m, n)).round(3)
    dosage[:, ::3] = rng.binomial(2, 0.4, (m, len(range(0, n, 3))))  # some hard calls among the dosages
    dosage[rng.random((m, n)) < 0.05] = np.nan
    pfile = _dosage_pgen(tmp_path, dosage)
    import_genotypes(PgenSource(pfile), tmp_path / "store", ImportParams(qc=NO_QC, pca=PCAParams(pcs=2)))
    arr = zarr.open_array(str(tmp_path / "store" / "dosages.zarr"), mode="r")
    assert arr.dtype == np.float32
    np.testing.assert_allclose(arr[:], dosage, atol=1e-4)  # .pgen keeps dosages to 1/16384
    variants = pd.read_parquet(tmp_path / "store" / "variants.parquet")
    np.testing.assert_allclose(variants["call_rate"], 1 - np.isnan(dosage).mean(1))  # a dosage is a call
    p = _plink("--pfile", str(pfile), "--freq", "--hardy", out=tmp_path / "plink")
    np.testing.assert_allclose(variants["a1_freq"], _table(p.with_suffix(".afreq"))["ALT_FREQS"], rtol=1e-5)
    np.testing.assert_allclose(variants["hwe_p"], _table(p.with_suffix(".hardy"))["P"], rtol=1e-5)  # on hard calls


@needs_plink2
def test_fam_with_na_phenotype_and_letter_sex_codes_reads_as_plink2_reads_it(planted, tmp_path):
    """'NA' in the .fam's phenotype column is a value (missing), not a missing column; sex U (or any other
    code) is unknown, M/F count as male/female, as plink2 reads them."""
    prefix, _, _ = planted
    copy = tmp_path / "x"
    for ext in (".bed", ".bim"):
        shutil.copy(f"{prefix}{ext}", f"{copy}{ext}")
    codes = ["1", "2", "U", "M", "F", "m", "f", "0", "NA", "9"]
    fam = pd.read_csv(f"{prefix}.fam", sep=r"\s+", header=None)
    fam[4] = np.resize(codes, len(fam))
    fam[5] = "NA"
    fam.to_csv(f"{copy}.fam", sep=" ", header=False, index=False)
    bed = BedSource(copy)
    assert list(bed.samples["sex"][:len(codes)]) == [1, 2, 0, 1, 2, 1, 2, 0, 0, 0]
    psam = _table(_plink("--bfile", str(copy), "--make-just-psam", out=tmp_path / "plink").with_suffix(".psam"))
    assert list(bed.samples["sex"]) == list(psam["SEX"].fillna(0).astype(int))
    Path(f"{copy}.fam").write_text("a a 0 0 1 NA\nb b 0 0\n")
    with pytest.raises(InputError, match="line 2 has fewer than 6 columns"):
        BedSource(copy)


@needs_plink2
def test_chromosome_y_counts_only_males_calls_as_plink2_does(tmp_path):
    """Females have no chrY call: plink2's call rates count chrY for males only, so neither the chrY
    variants (--geno) nor the females (--mind) fail for it; a female's stray chrY call is not counted."""
    rng = np.random.default_rng(9)
    n, m = 100, 12
    sex = np.tile([1, 2], n // 2)
    sex[:2] = 0                                                  # unknown: not a male, as in plink2
    calls = rng.binomial(2, 0.3, (n, m)).astype(np.float32)
    calls[[7, 8, 9], [3, 11, 4]] = np.nan                        # a few missing calls (s8 is a male)
    calls[sex != 1, 10:] = np.nan                                # chrY: no call for non-males...
    calls[5, 10] = 2                                             # ...but one stray call of a female
    iid = [f"s{i}" for i in range(n)]
    to_bed(tmp_path / "y.bed", calls, count_A1=True, properties={
        "fid": iid, "iid": iid, "sex": sex, "sid": [f"v{i}" for i in range(m)], "chromosome": ["1"] * 10 + ["Y"] * 2,
        "bp_position": np.arange(1, m + 1) * 1000, "allele_1": ["A"] * m, "allele_2": ["G"] * m})
    report = import_genotypes(BedSource(tmp_path / "y"), tmp_path / "store",
                              ImportParams(qc=QCParams(hwe_p=None, min_maf=None, min_mac=None), pca=PCAParams(pcs=1)))
    assert (report.samples, report.variants) == (n, m)  # nothing fails --mind or --geno for chrY
    p = _plink("--bfile", str(tmp_path / "y"), "--missing", "--freq", out=tmp_path / "plink")
    variants = pd.read_parquet(tmp_path / "store" / "variants.parquet")
    np.testing.assert_allclose(variants["call_rate"], 1 - _table(p.with_suffix(".vmiss"))["F_MISS"])
    np.testing.assert_allclose(variants["a1_freq"], _table(p.with_suffix(".afreq"))["ALT_FREQS"], rtol=1e-5)
    samples = pd.read_parquet(tmp_path / "store" / "samples.parquet")
    np.testing.assert_allclose(samples["call_rate"], 1 - _table(p.with_suffix(".smiss"))["F_MISS"])


def test_digest_is_deterministic_and_tracks_params_and_content(planted, tmp_path):
    prefix, calls, _ = planted
    first = _import(prefix, tmp_path / "a").digest
    moved = tmp_path / "moved" / "other"
    moved.parent.mkdir()
    for ext in (".bed", ".bim", ".fam"):
        shutil.copy(f"{prefix}{ext}", f"{moved}{ext}")
    assert _import(moved, tmp_path / "b").digest == first
    assert _import(prefix, tmp_path / "c", qc=QCParams(hwe_p=1e-8)).digest != first
    changed = calls.copy()
    changed[100, 5] = 0 if changed[100, 5] == 2 else 2
    assert _import(write_bed(tmp_path / "changed" / "x", changed), tmp_path / "d").digest != first
    pcs = [pd.read_parquet(tmp_path / d / "samples.parquet")[["pc1", "pc2", "pc3"]] for d in ("a", "b")]
    pd.testing.assert_frame_equal(*pcs)


def test_bad_files_name_the_file_and_leave_the_old_store(planted, tmp_path):
    prefix, _, _ = planted
    _import(prefix, tmp_path / "store")
    before = (tmp_path / "store" / "qc.json").read_text()

    no_bim = tmp_path / "no_bim" / "x"
    no_bim.parent.mkdir()
    for ext in (".bed", ".fam"):
        shutil.copy(f"{prefix}{ext}", f"{no_bim}{ext}")
    with pytest.raises(InputError) as e:
        BedSource(no_bim)
    assert e.value.what == f"{no_bim}.bim" and "not found" in e.value.reason

    truncated = tmp_path / "truncated" / "x"
    truncated.parent.mkdir()
    for ext in (".bim", ".fam"):
        shutil.copy(f"{prefix}{ext}", f"{truncated}{ext}")
    Path(f"{truncated}.bed").write_bytes(Path(f"{prefix}.bed").read_bytes()[:5000])
    with pytest.raises(InputError) as e:
        BedSource(truncated)
    assert e.value.what == f"{truncated}.bed" and "truncated" in e.value.reason

    proc = cli("genotypes", "import", "--bfile", str(truncated), "--out", str(tmp_path / "store"), "--params", str(tmp_path / "none.yaml"))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and f"{truncated}.bed" in lines[0] and "Traceback" not in proc.stderr
    assert (tmp_path / "store" / "qc.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("store")) == ["store"]  # nothing half-written

    # A folder that is not a genotype store is never replaced.
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not a genotype store"):
        _import(prefix, tmp_path / "precious")
    assert (tmp_path / "precious" / "keep.txt").exists()


def test_cli_exit_codes_and_summary(planted, tmp_path):
    prefix, _, _ = planted
    params = tmp_path / "params.yaml"
    params.write_text("genotypes:\n  chunk_variants: 100\n  seed: 3\n  qc: {hwe_p: 1.0e-8}\n  pca: {pcs: 4}\n")
    proc = cli("genotypes", "import", "--bfile", str(prefix), "--out", str(tmp_path / "s"), "--params", str(params), "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert "197 samples × 379 variants" in proc.stderr and "4 PCs" in proc.stderr
    qc = json.loads((tmp_path / "s" / "qc.json").read_text())
    assert qc["thresholds"]["hwe_p"] == 1e-8 and qc["chunk_variants"] == 100 and qc["pca"]["seed"] == 3
    for args, words in [([], "give exactly one of --bfile PREFIX or --pfile PREFIX"),
                        (["--bfile", str(tmp_path / "nothing")], "nothing.bed: not found")]:
        proc = cli("genotypes", "import", "--out", str(tmp_path / "t"), *args)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], (args, proc.stderr)
    params.write_text("genotypes:\n  qc: {mnd: 0.1}\n")
    proc = cli("genotypes", "import", "--bfile", str(prefix), "--out", str(tmp_path / "t"), "--params", str(params))
    assert proc.returncode == 2 and "unknown parameter(s) mnd" in proc.stderr


def test_unmatched_ids_are_reported_not_dropped(phantom_dir, ingested_store, tmp_path):
    truth = pd.read_csv(phantom_dir / "ground_truth" / "subjects.tsv", sep="\t")
    fam = pd.read_csv(phantom_dir / "genotypes" / "phantom.fam", sep=r"\s+", header=None)
    not_genotyped = sorted(truth.loc[~truth["genotyped"], "subject_id"])
    not_imaged = sorted(set(fam[1]) - set(truth["subject_id"]))
    assert not_genotyped and not_imaged
    participants = phantom_dir / "bids" / "participants.tsv"
    assert imaging_subjects(participants) == imaging_subjects(ingested_store) == sorted(truth["subject_id"])

    proc = cli("genotypes", "import", "--bfile", str(phantom_dir / "genotypes" / "phantom"), "--out", str(tmp_path / "s"),
               "--subjects", str(ingested_store), "--params", str(tmp_path / "none.yaml"), check=0)
    assert f"{len(not_imaged)} genotyped not imaged, {len(not_genotyped)} imaged not genotyped" in proc.stderr
    m = json.loads((tmp_path / "s" / "qc.json").read_text())["id_matching"]
    assert m["genotyped_not_imaged"] == not_imaged and m["imaged_not_genotyped"] == not_genotyped
    assert m["matched"] == len(truth) - len(not_genotyped) and m["source"] == str(ingested_store)
    samples = pd.read_parquet(tmp_path / "s" / "samples.parquet")
    assert set(not_imaged) <= set(samples["iid"])  # still in the store
    assert samples.filter(like="pc").shape[1] == len(samples) - 1  # 10 PCs asked; a tiny cohort has fewer


def test_pcs_separate_two_populations(tmp_path):
    from endopheno.phantom.genetics import simulate, write_plink

    g = simulate(120, seed=5, chromosomes=2, chromosome_length_mb=2.0, effective_size=10_000, recombination_rate=1e-8,
                 mutation_rate=1.25e-8, min_maf=0.01, second_population_fraction=0.4, split_generations=1000)
    iids = [f"i{j:03d}" for j in range(120)]
    write_plink(tmp_path / "two" / "pops", g, iids, np.ones(120, int), np.arange(120), 0.005, np.random.default_rng(0))
    report = import_genotypes(BedSource(tmp_path / "two" / "pops"), tmp_path / "store", ImportParams(seed=1, chunk_variants=2048))
    samples = pd.read_parquet(tmp_path / "store" / "samples.parquet")
    assert report.pcs == 10 and list(samples["iid"]) == iids
    pc1 = samples["pc1"].to_numpy()
    a, b = pc1[g.population == 0], pc1[g.population == 1]
    assert max(a.max(), b.max()) > 0 > min(a.min(), b.min())
    assert a.max() < b.min() or b.max() < a.min()  # no overlap on PC1
    assert abs(np.corrcoef(samples["pc2"], g.population)[0, 1]) < 0.3  # the structure is in PC1 alone
    np.testing.assert_allclose(np.linalg.norm(samples[[f"pc{i}" for i in range(1, 11)]], axis=0), 1, rtol=1e-4)
    qc = json.loads((tmp_path / "store" / "qc.json").read_text())
    ratio = qc["pca"]["explained_variance_ratio"]
    used = pd.read_parquet(tmp_path / "store" / "variants.parquet").query("pca")["id"]
    assert ratio[0] > 2 * ratio[1] and 0 < qc["pca"]["variants_used"] == len(used) < report.variants
    # On a dask cluster (here an in-process one), the same PCs.
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        import_genotypes(BedSource(tmp_path / "two" / "pops"), tmp_path / "on_cluster", ImportParams(seed=1, chunk_variants=2048),
                         scheduler=cluster.scheduler_address)
    on_cluster = pd.read_parquet(tmp_path / "on_cluster" / "samples.parquet")
    np.testing.assert_allclose(on_cluster.filter(like="pc"), samples.filter(like="pc"), atol=1e-5)
    if PLINK2:  # plink2's exact PCA of the same variants finds the same PC1
        (tmp_path / "used.txt").write_text("\n".join(used) + "\n")
        p = _plink("--bfile", str(tmp_path / "two" / "pops"), "--extract", str(tmp_path / "used.txt"), "--pca", "3", out=tmp_path / "pca")
        assert abs(np.corrcoef(_table(p.with_suffix(".eigenvec"))["PC1"], pc1)[0, 1]) > 0.999


def test_ld_pruning_leaves_no_linked_pair_and_prunes_only_linked_variants():
    rng = np.random.default_rng(2)
    n, m, window, r2 = 300, 600, 20, 0.2
    base = rng.normal(size=(m, n))
    z = base.copy()
    for i in range(1, m):  # blocks of strongly correlated neighbours
        if i % 7:
            z[i] = 0.8 * z[i - 1] + 0.6 * base[i]
    chrom = np.repeat(["1", "2"], m // 2)
    z = (z - z.mean(1, keepdims=True)).astype(np.float32)
    pruner = LDPruner(window, r2)
    kept = np.concatenate([pruner.add(z[s:s + 97], chrom[s:s + 97]) for s in range(0, m, 97)])
    corr2 = np.corrcoef(z) ** 2
    near = np.abs(np.subtract.outer(np.arange(m), np.arange(m))) < window
    same = chrom[:, None] == chrom[None, :]
    linked = (corr2 > r2) & near & same & ~np.eye(m, dtype=bool)
    assert not linked[np.ix_(kept, kept)].any()
    assert linked[~kept][:, kept].any(axis=1).all()  # every pruned variant has a kept partner
    assert 0.1 < kept.mean() < 0.9
