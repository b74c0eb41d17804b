"""The association engine against statsmodels (to 1e-8) and plink2 --glm (to its printed precision)."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import cli
from endopheno.genotypes.sources import MISSING, BedSource, PgenSource
from endopheno.gwas.linear import associate_block, phenotype_groups, t_test_p
from endopheno.gwas.phenotypes import align, read_table
from endopheno.gwas.run import GwasOptions, _torch_product, scan
from endopheno.gwas.simulate import write_study

PLINK2 = shutil.which("plink2")
needs_plink2 = pytest.mark.skipif(PLINK2 is None, reason="plink2 is not installed (apt-get install plink2)")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """500 samples, 400 variants (2% missing calls), 5 phenotypes (5% missing), 3 covariates, 2 causal."""
    return write_study(tmp_path_factory.mktemp("study"), samples=500, variants=400, phenotypes=5,
                       missing_genotypes=0.02, missing_phenotypes=0.05, causal={7: 1.0, 300: 0.8}, seed=3)


def small_problem(seed=0, n=240, m=30, p=4):
    rng = np.random.default_rng(seed)
    dosages = rng.binomial(2, rng.uniform(0.05, 0.5, (m, 1)), (m, n)).astype(np.int8)
    dosages[rng.random((m, n)) < 0.05] = MISSING
    covariates = rng.normal(size=(n, 3))
    y = rng.normal(size=(n, p)) + 0.4 * np.clip(dosages[0], 0, 2)[:, None]
    y[rng.random((n, p)) < 0.1] = np.nan
    y[:, 1] = y[:, 0] + 1  # same missingness as y0: one group with two phenotypes
    return dosages, covariates, y


@pytest.mark.parametrize("missing", ["exact", "mean"])
def test_kernel_matches_statsmodels(missing):
    import statsmodels.api as sm

    dosages, covariates, y = small_problem()
    names = [f"y{j}" for j in range(y.shape[1])]
    groups = phenotype_groups(y, covariates, names)
    assert len(groups) == y.shape[1] - 1
    checked = 0
    for group in groups:
        r = associate_block(dosages, group, missing=missing)
        for j, name in enumerate(group.names):
            pheno = y[:, names.index(name)]
            for v in range(len(dosages)):
                g = dosages[v].astype(float)
                g[dosages[v] == MISSING] = np.nan
                if missing == "mean":
                    g[np.isnan(g)] = np.nanmean(g[~np.isnan(pheno)])
                use = ~np.isnan(pheno) & ~np.isnan(g)
                fit = sm.OLS(pheno[use], np.column_stack([np.ones(use.sum()), g[use], covariates[use]])).fit()
                assert r.n[v] == use.sum()
                np.testing.assert_allclose(r.beta[v, j], fit.params[1], rtol=1e-8)
                np.testing.assert_allclose(r.se[v, j], fit.bse[1], rtol=1e-8)
                np.testing.assert_allclose(r.p[v, j], fit.pvalues[1], rtol=1e-8)
                checked += 1
    assert checked == len(dosages) * y.shape[1]


def test_float32_product_stays_within_1e4_of_float64_in_t():
    rng = np.random.default_rng(5)
    n = 4000
    dosages = rng.binomial(2, rng.uniform(0.01, 0.5, (200, 1)), (200, n)).astype(np.int8)
    dosages[rng.random(dosages.shape) < 0.01] = MISSING
    y = rng.normal(size=(n, 8)) + 0.2 * np.clip(dosages[:8].T, 0, 2)
    group = phenotype_groups(y, rng.normal(size=(n, 3)), [f"y{j}" for j in range(8)])[0]
    t64 = associate_block(dosages, group).t_stat
    t32 = associate_block(dosages, group, precision="float32").t_stat
    assert np.abs(t64).max() > 5  # real signal among the tests
    assert np.nanmax(np.abs(t32 - t64)) < 1e-4


def test_torch_product_matches_numpy():
    dosages, covariates, y = small_problem(1)
    group = phenotype_groups(y[:, :1], covariates, ["y0"])[0]
    expected = associate_block(dosages, group)
    got = associate_block(dosages, group, product=_torch_product("cpu"))
    np.testing.assert_allclose(got.t_stat, expected.t_stat, rtol=1e-10)


@pytest.mark.gpu
def test_cuda_product_matches_numpy():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    dosages, covariates, y = small_problem(2)
    group = phenotype_groups(y[:, :2], covariates, ["y0", "y1"])[0]
    for precision, tol in (("float64", 1e-10), ("float32", 1e-4)):
        got = associate_block(dosages, group, precision=precision, product=_torch_product("cuda"))
        expected = associate_block(dosages, group)
        assert np.nanmax(np.abs(got.t_stat - expected.t_stat)) < tol


def test_log10_p_is_exact_beyond_double_underflow():
    from mpmath import mp, betainc

    mp.dps = 50
    t, df = np.array([3.0, 40.0, 80.0]), np.array([100.0, 500.0, 5000.0])
    p, log10_p = t_test_p(t, df)
    for ti, di, lp in zip(t, df, log10_p):
        exact = -mp.log10(betainc(di / 2, 0.5, 0, di / (di + ti**2), regularized=True))
        assert abs(lp - float(exact)) < 1e-9 * float(exact)
    assert p[2] == 0 and log10_p[2] > 300


def test_untestable_variants_are_reported_not_invented():
    dosages, covariates, y = small_problem(3, m=4)
    dosages[1] = 1               # constant
    dosages[2] = MISSING         # never called
    dosages[3, 5:] = MISSING     # five observations for a model with five parameters
    r = associate_block(dosages, phenotype_groups(y[:, :1], covariates, ["y0"])[0])
    assert r.reason[0] == "" and np.isfinite(r.t_stat[0]).all()
    assert r.reason[1] == "constant or collinear with covariates"
    assert r.reason[2] == "too few observations" and r.reason[3] == "too few observations"
    assert np.isnan(r.beta[1:]).all() and np.isnan(r.p[1:]).all()


def plink2_glm(bfile, pheno, covar, out, *modifiers):
    """plink2 --glm hide-covar omit-ref [MODIFIERS] (allow-no-covars without `covar`); returns `out`."""
    covar_args = ["--covar", covar] if covar is not None else []
    glm = ["hide-covar", "omit-ref", *modifiers, *([] if covar is not None else ["allow-no-covars"])]
    subprocess.run([PLINK2, "--bfile", bfile, "--pheno", pheno, *covar_args, "--glm", *glm, "--threads", "1",
                    "--out", out], check=True, capture_output=True)
    return out


def write_fileset(folder, g: np.ndarray, *, chrom=None, ids=None, pos=None, sex=None) -> list[str]:
    """Write (samples × variants) allele counts, NaN = missing, as FOLDER/t.bed/.bim/.fam (chromosome 1,
    IDs v0.., positions 1000, 2000, .. unless given); returns the sample IDs s0, s1, .."""
    from bed_reader import to_bed

    n, m = g.shape
    iid = [f"s{i}" for i in range(n)]
    properties = {"fid": iid, "iid": iid, "sid": [f"v{i}" for i in range(m)] if ids is None else ids,
                  "chromosome": ["1"] * m if chrom is None else chrom,
                  "bp_position": np.arange(1, m + 1) * 1000 if pos is None else pos,
                  "allele_1": ["A"] * m, "allele_2": ["G"] * m, **({} if sex is None else {"sex": sex})}
    to_bed(folder / "t.bed", g, count_A1=True, properties=properties)
    return iid


def write_table(path, iid: list[str], **columns) -> None:
    """A PLINK 2 phenotype/covariate table: #FID, IID (both `iid`), then `columns`; NA = missing."""
    pd.DataFrame({"#FID": iid, "IID": iid, **columns}).to_csv(path, sep="\t", index=False, na_rep="NA")


def read_plink(prefix, name):
    return pd.read_csv(f"{prefix}.{name}.glm.linear", sep="\t")


def assert_matches_plink2(ours: pd.DataFrame, plink: pd.DataFrame, variants: int) -> pd.DataFrame:
    """Our results of one phenotype against plink2's: same rows, A1 and OBS_CT; BETA and SE within 1e-5
    relative, |Δ log10 p| ≤ 1e-5 (plink2 prints 6 digits). Returns the merged table."""
    both = ours.merge(plink, left_on="id", right_on="ID", validate="1:1")
    assert len(both) == variants
    assert (both.a1 == both.A1).all() and (both.n == both.OBS_CT).all()
    assert np.max(np.abs(both.beta - both.BETA) / np.abs(both.BETA)) < 1e-5
    assert np.max(np.abs(both.se - both.SE) / both.SE) < 1e-5
    assert np.max(np.abs(both.log10_p + np.log10(both.P))) < 1e-5
    return both


@needs_plink2
def test_variant_whose_missing_calls_make_a_covariate_constant_is_not_tested(tmp_path):
    """Site B's three samples lack a call of v0: on its called samples site is constant, so the model has no
    unique fit (plink2: NA, VIF_INFINITE). v1 lacks two of the three: fine, and as plink2 computes it."""
    rng = np.random.default_rng(1)
    n, m = 80, 6
    g = rng.binomial(2, 0.3, (n, m)).astype(np.float32)
    site = np.zeros(n)
    site[:3] = 1
    g[:3, 0] = np.nan
    g[:2, 1] = np.nan
    iid = write_fileset(tmp_path, g)
    write_table(tmp_path / "y.tsv", iid, y=rng.normal(size=n) + 2 * site)
    write_table(tmp_path / "c.tsv", iid, site=site, age=rng.normal(size=n))
    plink2_glm(tmp_path / "t", tmp_path / "y.tsv", tmp_path / "c.tsv", tmp_path / "plink")
    plink = read_plink(tmp_path / "plink", "y")
    assert plink.ERRCODE[0] == "VIF_INFINITE"
    bed = BedSource(tmp_path / "t")
    summary = scan(bed, align(read_table(tmp_path / "y.tsv"), bed.samples),
                   align(read_table(tmp_path / "c.tsv", kind="covariate"), bed.samples), tmp_path / "out",
                   GwasOptions(workers=1))
    ours = pq.read_table(tmp_path / "out" / "results").to_pandas().sort_values("variant", ignore_index=True)
    assert ours.reason[0] == "covariates constant or collinear on the samples with a call"
    assert np.isnan(ours.loc[0, ["beta", "se", "p"]].to_numpy(float)).all() and ours.n[0] == plink.OBS_CT[0]
    assert summary.untested == {ours.reason[0]: 1}
    assert_matches_plink2(ours[1:], plink[1:], m - 1)


@needs_plink2
def test_sex_chromosomes_are_modelled_as_plink2_models_them(tmp_path):
    """chrX: sex is a covariate and samples of unknown sex are left out; chrY: males only; autosomes as
    ever — blocks never mix them. The numbers are plink2's, and so are the lead models' samples."""
    from endopheno.gwas.results import lead_models

    rng = np.random.default_rng(2)
    n = 200
    sex = np.tile([1, 2], n // 2)
    sex[:6] = 0
    chrom = ["1"] * 4 + ["X"] * 5 + ["Y"] * 3 + ["2"] * 2
    g = rng.binomial(2, 0.3, (n, len(chrom))).astype(np.float32)
    haploid = np.array([c in "XY" for c in chrom])
    g[np.ix_(sex == 1, haploid)] = 2 * rng.binomial(1, 0.3, ((sex == 1).sum(), haploid.sum()))  # males: 0 or 2
    g[np.ix_(sex != 1, np.array(chrom) == "Y")] = np.nan
    g[rng.random(g.shape) < 0.02] = np.nan
    iid = write_fileset(tmp_path, g, chrom=chrom, sex=sex)
    y = rng.normal(size=n) + 0.8 * np.nan_to_num(g[:, 4]) + 0.5 * (sex == 2)
    write_table(tmp_path / "y.tsv", iid, y=y)
    write_table(tmp_path / "c.tsv", iid, age=rng.normal(size=n))
    plink2_glm(tmp_path / "t", tmp_path / "y.tsv", tmp_path / "c.tsv", tmp_path / "plink", "cols=+a1freq")
    bed = BedSource(tmp_path / "t")
    pheno = align(read_table(tmp_path / "y.tsv"), bed.samples)
    covar = align(read_table(tmp_path / "c.tsv", kind="covariate"), bed.samples)
    scan(bed, pheno, covar, tmp_path / "out", GwasOptions(workers=1, block_variants=3))
    ours = pq.read_table(tmp_path / "out" / "results").to_pandas()
    both = assert_matches_plink2(ours, read_plink(tmp_path / "plink", "y"), len(chrom))
    np.testing.assert_allclose(both.a1_freq, both.A1_FREQ, rtol=1e-5)  # chrY's haploid too
    assert both.n[both.chrom == "Y"].max() <= 97 and both.n[both.chrom == "X"].max() <= 194
    lead = pd.DataFrame({"phenotype": ["y"], "lead_id": ["v4"], "lead_variant": [4], "chrom": ["X"]})
    model = lead_models(lead, bed, pheno, covar).set_index("term")
    assert "sex" in model.index and model.loc["v4", "coef"] == pytest.approx(both.BETA[4], rel=1e-5)


@needs_plink2
def test_cli_reproduces_plink2_glm(study, tmp_path):
    """BETA and SE within 1e-5 relative, |Δ log10 p| ≤ 1e-5, same OBS_CT and A1 (plink2 prints 6 digits)."""
    folder = study.parent
    plink2_glm(study, folder / "pheno.tsv", folder / "covar.tsv", tmp_path / "plink")
    cli("gwas", "--bfile", str(study), "--pheno", str(folder / "pheno.tsv"), "--covar", str(folder / "covar.tsv"),
        "--out", str(tmp_path / "ours"), "--no-mlflow", "--workers", "2", "--block-variants", "128", check=0)
    ours = pq.read_table(tmp_path / "ours" / "results").to_pandas()
    assert len(ours) == 400 * 5 and ours["reason"].isna().all()
    for name in [f"y{j}" for j in range(5)]:
        both = assert_matches_plink2(ours[ours.phenotype == name], read_plink(tmp_path / "plink", name), 400)
        assert both.n.nunique() > 10  # missing calls really varied the sample sets
    summary = json.loads((tmp_path / "ours" / "summary.json").read_text())
    leads = {(row["phenotype"], row["lead_id"]) for row in pd.read_parquet(tmp_path / "ours" / "loci.parquet").to_dict("records")}
    causal = BedSource(study).variants["id"].iloc[[7, 300]]
    assert {(f"y{j}", causal.iloc[0]) for j in (0, 2, 4)} <= leads   # the strong causal variant, every even phenotype
    assert not any(name in {"y1", "y3"} for name, _ in leads)        # and nothing for the null ones
    assert summary["hits_genome_wide"] >= 3


@needs_plink2
def test_pgen_input_gives_the_same_results(study, tmp_path):
    subprocess.run([PLINK2, "--bfile", study, "--make-pgen", "--out", tmp_path / "study"], check=True, capture_output=True)
    bed, pgen = BedSource(study), PgenSource(tmp_path / "study")
    calls = bed.read(0, 400).astype(np.float32)
    calls[calls == MISSING] = np.nan
    np.testing.assert_array_equal(calls, pgen.read(0, 400))  # a .pgen is read as dosages
    np.testing.assert_array_equal(bed.read(0, 400), pgen.as_hard_calls().read(0, 400))
    assert (bed.variants == pgen.variants).all(axis=None)
    pheno = align(read_table(study.parent / "pheno.tsv"), bed.samples)
    runs = [scan(src, pheno, None, tmp_path / kind, GwasOptions(workers=1))
            for kind, src in (("bed", bed), ("pgen", pgen))]
    assert runs[0].tests == runs[1].tests == 400 * 5
    a, b = (pq.read_table(tmp_path / k / "results").to_pandas() for k in ("bed", "pgen"))
    pd.testing.assert_frame_equal(a.astype({"id": str}), b.astype({"id": str}))


def test_null_phenotypes_keep_type_one_error(tmp_path):
    prefix = write_study(tmp_path, samples=1500, variants=1500, phenotypes=12, missing_genotypes=0.01, seed=11)
    bed = BedSource(prefix)
    scan(bed, align(read_table(tmp_path / "pheno.tsv"), bed.samples),
         align(read_table(tmp_path / "covar.tsv"), bed.samples), tmp_path / "out", GwasOptions(workers=2))
    p = pq.read_table(tmp_path / "out" / "results", columns=["p"]).column("p").to_numpy()
    from scipy import stats

    lam = stats.chi2.isf(np.median(p), 1) / stats.chi2.ppf(0.5, 1)
    assert len(p) == 18000 and 0.95 <= lam <= 1.05
    assert 0.0075 <= np.mean(p < 0.01) <= 0.0125
    assert 0.04 <= np.mean(p < 0.05) <= 0.06


def test_runs_on_an_existing_dask_cluster(study, tmp_path):
    from dask.distributed import LocalCluster

    bed = BedSource(study)
    pheno = align(read_table(study.parent / "pheno.tsv"), bed.samples)
    covar = align(read_table(study.parent / "covar.tsv"), bed.samples)
    scan(bed, pheno, covar, tmp_path / "local", GwasOptions(workers=1))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        scan(bed, pheno, covar, tmp_path / "cluster", GwasOptions(scheduler=cluster.scheduler_address, block_variants=100))
    a, b = (pq.read_table(tmp_path / k / "results").to_pandas().sort_values(["phenotype", "id"], ignore_index=True)
            for k in ("local", "cluster"))
    pd.testing.assert_frame_equal(a.astype({"id": str, "chrom": str}), b.astype({"id": str, "chrom": str}))


def test_phenotype_tables_follow_plink_conventions(tmp_path):
    samples = pd.DataFrame({"fid": ["f1", "f2", "f3"], "iid": ["a", "b", "c"]})
    (tmp_path / "p.tsv").write_text("#FID\tIID\tx\ty\nf1\ta\t1.5\tNA\nf2\tb\t-9\t2\nf9\tz\t3\t3\n")
    table = align(read_table(tmp_path / "p.tsv"), samples)
    np.testing.assert_array_equal(table.values, [[1.5, np.nan], [np.nan, 2.0], [np.nan, np.nan]])
    assert table.unmatched == ["f9 z"]
    (tmp_path / "c.tsv").write_text("IID sex site\na M 1\nb F -9\nc -9 2\n")
    covar = align(read_table(tmp_path / "c.tsv", kind="covariate"), samples)
    assert covar.names == ["sex_M", "site"]
    np.testing.assert_array_equal(covar.values, [[1, 1], [0, np.nan], [np.nan, 2]])  # -9 is missing, as in plink2
    # Whitespace-aligned (runs of spaces) as plink2 reads it; with a tab in the header, single tabs split.
    (tmp_path / "aligned.txt").write_text("#FID   IID   y\nf1     a     1.5\nf2     b     2.25\n")
    np.testing.assert_array_equal(align(read_table(tmp_path / "aligned.txt"), samples).values,
                                  [[1.5], [2.25], [np.nan]])
    (tmp_path / "empty.tsv").write_text("IID\tx\ty\na\t\t1\nb\t2\t\n")
    np.testing.assert_array_equal(align(read_table(tmp_path / "empty.tsv"), samples).values,
                                  [[np.nan, 1], [2, np.nan], [np.nan, np.nan]])


@needs_plink2
def test_minus_nine_covariates_and_aligned_tables_read_as_plink2_reads_them(study, tmp_path):
    """-9 in --covar is missing for plink2 too (five -9 ages: OBS_CT 5 lower), and plink2 reads tables whose
    columns are aligned with runs of spaces."""
    folder = study.parent
    covar = pd.read_csv(folder / "covar.tsv", sep="\t")
    covar.loc[:4, "c0"] = -9
    pheno = pd.read_csv(folder / "pheno.tsv", sep="\t")[["#FID", "IID", "y0"]]
    for table, name in ((covar, "covar.txt"), (pheno, "pheno.txt")):
        (tmp_path / name).write_text(table.to_string(index=False, na_rep="NA", justify="left") + "\n")
    assert "   " in (tmp_path / "pheno.txt").read_text().splitlines()[0]
    plink2_glm(study, tmp_path / "pheno.txt", tmp_path / "covar.txt", tmp_path / "plink")
    bed = BedSource(study)
    scan(bed, align(read_table(tmp_path / "pheno.txt"), bed.samples),
         align(read_table(tmp_path / "covar.txt", kind="covariate"), bed.samples), tmp_path / "ours",
         GwasOptions(workers=1))
    ours = pq.read_table(tmp_path / "ours" / "results").to_pandas()
    assert_matches_plink2(ours, read_plink(tmp_path / "plink", "y0"), 400)


@pytest.mark.parametrize("content, message", [
    ("FID\tx\nf1\t1\n", "must start with IID"),
    ("IID\tx\ns000000\tabc\n", "x of sample s000000 is not a number ('abc')"),
    ("IID\tx\ns000000\t1\ns000000\t2\n", "sample s000000 appears more than once"),
])
def test_bad_phenotype_file_is_one_clear_line(study, tmp_path, content, message):
    (tmp_path / "bad.tsv").write_text(content)
    proc = cli("gwas", "--bfile", str(study), "--pheno", str(tmp_path / "bad.tsv"), "--out", str(tmp_path / "o"),
               "--no-mlflow", check=2)
    assert message in proc.stderr and "bad.tsv" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_collinear_covariates_are_named(study, tmp_path):
    covar = pd.read_csv(study.parent / "covar.tsv", sep="\t")
    covar["c3"] = 2 * covar["c0"]
    covar.to_csv(tmp_path / "covar.tsv", sep="\t", index=False)
    proc = cli("gwas", "--bfile", str(study), "--pheno", str(study.parent / "pheno.tsv"), "--covar",
               str(tmp_path / "covar.tsv"), "--out", str(tmp_path / "o"), "--no-mlflow", check=2)
    assert f"{tmp_path / 'covar.tsv'}: c3 collinear with the other covariates" in proc.stderr
    assert "Traceback" not in proc.stderr


@needs_plink2
def test_covariate_unusable_on_one_phenotype_leaves_the_others_tested(tmp_path, caplog):
    """As plink2: a covariate constant on one phenotype's samples is left out of that phenotype's model only
    (one line says so); a phenotype none of whose samples has every covariate is not tested, with its reason
    in summary.json; the other phenotypes are tested as plink2 tests them."""
    from endopheno.gwas.study import analyse

    rng = np.random.default_rng(1)
    n, m = 120, 6
    g = rng.binomial(2, 0.3, (n, m)).astype(np.float32)
    iid = write_fileset(tmp_path, g)
    site = (np.arange(n) < 40).astype(float)
    age = rng.normal(size=n)
    age[100:] = np.nan
    y = rng.normal(size=n) + 2 * site + g[:, 0]
    write_table(tmp_path / "pheno.tsv", iid, y=y, site0_only=np.where(site == 0, y, np.nan),
                no_age=np.where(np.isnan(age), y, np.nan))
    write_table(tmp_path / "covar.tsv", iid, site=site, age=age)
    plink2_glm(tmp_path / "t", tmp_path / "pheno.tsv", tmp_path / "covar.tsv", tmp_path / "plink")
    assert "Not including covariate 'site'" in (tmp_path / "plink.log").read_text().replace("\n", " ")
    bed = BedSource(tmp_path / "t")
    phenotypes = align(read_table(tmp_path / "pheno.tsv"), bed.samples)
    covariates = align(read_table(tmp_path / "covar.tsv", kind="covariate"), bed.samples)
    with caplog.at_level("WARNING"):
        summary = scan(bed, phenotypes, covariates, tmp_path / "out", GwasOptions(workers=1))
    assert "Not including covariate 'site' in the regression on phenotype 'site0_only'" in caplog.text
    assert set(summary.left_out) == {"no_age"} and "no sample has" in summary.left_out["no_age"]
    study = analyse(tmp_path / "out", bed, phenotypes, covariates)
    assert study["phenotypes_left_out"] == summary.left_out
    ours = pq.read_table(tmp_path / "out" / "results").to_pandas()
    assert set(ours.phenotype) == {"y", "site0_only"}
    for name in ("y", "site0_only"):
        assert_matches_plink2(ours[ours.phenotype == name], read_plink(tmp_path / "plink", name), m)


def test_killed_scan_leaves_the_previous_results(study, tmp_path):
    import os
    import signal
    import time

    args = ["gwas", "--bfile", str(study), "--pheno", str(study.parent / "pheno.tsv"), "--out", str(tmp_path),
            "--no-mlflow", "--workers", "1"]
    cli(*args, check=0)
    before = pq.read_table(tmp_path / "results").to_pandas()
    exe = str(__import__("pathlib").Path(__import__("sys").executable).with_name("endopheno"))
    proc = subprocess.Popen([exe, *args, "--block-variants", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not list((tmp_path / ".partial" / "results").glob("part-*.parquet")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    pd.testing.assert_frame_equal(pq.read_table(tmp_path / "results").to_pandas(), before)
    cli(*args, check=0)  # a rerun completes and clears the partial folder
    assert not (tmp_path / ".partial").exists()


def test_gwas_run_is_recorded_in_mlflow_with_plots(study, tmp_path):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    proc = cli("gwas", "--bfile", str(study), "--pheno", str(study.parent / "pheno.tsv"), "--covar",
               str(study.parent / "covar.tsv"), "--out", str(out), "--tracking-uri", uri, "--workers", "1", check=0)
    run_id = proc.stderr.split("MLflow run ")[-1].split()[0]
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    summary = json.loads((out / "summary.json").read_text())
    assert run.data.metrics["hits_genome_wide"] == summary["hits_genome_wide"] >= 3
    assert 0.8 < run.data.metrics["lambda_gc.y1"] < 1.2
    assert run.data.params["genotypes"].endswith("study.bed") and run.data.tags["git_revision"]
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"summary.json", "loci.parquet", "plots/qq.png", "plots/manhattan_all.png", "plots/manhattan_y0.png"} <= artifacts
    for png in (out / "plots").glob("*.png"):
        assert min(Image.open(png).size) > 300
    leads = pd.read_parquet(out / "leads.parquet")
    assert {"intercept", "c0", "c1", "c2"} <= set(leads["term"])  # covariate coefficients of each lead model


def test_clumping_groups_variants_in_ld_within_the_window(tmp_path):
    from bed_reader import to_bed

    from endopheno.gwas.results import ClumpParams, clump

    rng = np.random.default_rng(8)
    n = 800
    a = rng.binomial(2, 0.3, n)

    def noisy_copy(g, share):
        g = g.copy()
        redo = rng.random(n) < share
        g[redo] = rng.binomial(2, 0.3, redo.sum())
        return g

    b, c, d = noisy_copy(a, 0.05), rng.binomial(2, 0.4, n), noisy_copy(a, 0.15)
    null = rng.binomial(2, 0.3, (n, 6))
    dosages = np.column_stack([a, b, c, null[:, :3], d, null[:, 3:]]).astype(np.int8)
    pos = np.array([100_000, 110_000, 120_000, 300_000, 400_000, 500_000, 900_000, 1_200_000, 1_300_000, 1_400_000])
    ids = np.array([f"v{i}" for i in range(len(pos))])
    to_bed(tmp_path / "ld.bed", dosages, properties={"iid": [f"s{i}" for i in range(n)], "sid": ids,
           "chromosome": ["1"] * len(pos), "bp_position": pos, "allele_1": ["A"] * len(pos), "allele_2": ["G"] * len(pos)})
    y = a + c + rng.normal(size=n) * 1.5
    (tmp_path / "y.tsv").write_text("IID\ty\n" + "".join(f"s{i}\t{v}\n" for i, v in enumerate(y)))
    bed = BedSource(tmp_path / "ld")
    scan(bed, align(read_table(tmp_path / "y.tsv"), bed.samples), None, tmp_path / "out", GwasOptions(workers=1))
    loci = clump(tmp_path / "out", bed, ClumpParams(p1=5e-8, p2=1e-2, r2=0.1, kb=500))
    assert list(loci.sort_values("lead_pos").lead_id) == ["v0", "v2", "v6"]  # A (with B), C apart, D beyond 500 kb
    assert loci.set_index("lead_id").loc["v0", "variants"] == 2 and loci.set_index("lead_id").loc["v0", "end"] == 110_000


@needs_plink2
def test_variants_without_unique_ids_are_told_apart_by_their_row(tmp_path):
    """IDs may all be '.' (normal in a .pvar made from a VCF): the scan, clumping and lead models identify a
    variant by its row, as plink2 does; the statistics are plink2's, row for row."""
    from endopheno.gwas.study import analyse

    rng = np.random.default_rng(3)
    n, m = 300, 20
    g = rng.binomial(2, 0.3, (n, m)).astype(np.float32)
    iid = write_fileset(tmp_path, g, ids=["."] * m, chrom=["1"] * 10 + ["2"] * 10,
                        pos=np.tile(np.arange(1, 11) * 1000, 2))
    write_table(tmp_path / "y.tsv", iid, y=rng.normal(size=n) + g[:, 3])
    bed = BedSource(tmp_path / "t")
    pheno = align(read_table(tmp_path / "y.tsv"), bed.samples)
    scan(bed, pheno, None, tmp_path / "out", GwasOptions(workers=1, block_variants=7))
    summary = analyse(tmp_path / "out", bed, pheno, None)
    loci, leads = (pd.read_parquet(tmp_path / "out" / f"{name}.parquet") for name in ("loci", "leads"))
    assert summary["loci"] == 1 and list(loci.lead_variant) == [3] and list(loci.lead_id) == ["."]
    assert set(leads.lead_variant) == {3} and leads.loc[leads.term == ".", "coef"].item() == pytest.approx(1, abs=0.2)
    plink2_glm(tmp_path / "t", tmp_path / "y.tsv", None, tmp_path / "plink")
    ours = pq.read_table(tmp_path / "out" / "results").to_pandas().sort_values("variant", ignore_index=True)
    plink = read_plink(tmp_path / "plink", "y")
    assert list(ours.variant) == list(range(m))
    np.testing.assert_allclose(ours.beta, plink.BETA, rtol=1e-5)
    np.testing.assert_allclose(ours.log10_p, -np.log10(plink.P), atol=1e-5)


def test_phenotype_names_with_slashes_and_quotes_survive_the_post_scan_step(study, tmp_path):
    from endopheno.gwas.study import analyse, track

    names = {"y0": "gm/wm", "y2": "gm_wm", "y4": "parkinson's"}  # the causal ones: each gets a Manhattan plot
    pheno = pd.read_csv(study.parent / "pheno.tsv", sep="\t")[["#FID", "IID", *names]].rename(columns=names)
    pheno.to_csv(tmp_path / "pheno.tsv", sep="\t", index=False, na_rep="NA")
    bed = BedSource(study)
    phenotypes = align(read_table(tmp_path / "pheno.tsv"), bed.samples)
    covariates = align(read_table(study.parent / "covar.tsv", kind="covariate"), bed.samples)
    scan(bed, phenotypes, covariates, tmp_path / "out", GwasOptions(workers=1))
    summary = analyse(tmp_path / "out", bed, phenotypes, covariates)
    plots = {p.name for p in (tmp_path / "out" / "plots").glob("manhattan_*.png")}
    assert {"manhattan_gm_wm.png", "manhattan_gm_wm_2.png", "manhattan_parkinson_s.png"} <= plots  # distinct
    scan_record = json.loads((tmp_path / "out" / "scan.json").read_text())
    track(tmp_path / "out", summary, scan_record, {"pheno": "pheno.tsv"}, uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_min_maf_and_min_mac_filter_variants(study, tmp_path):
    bed = BedSource(study)
    pheno = align(read_table(study.parent / "pheno.tsv", ["y1"]), bed.samples)
    summary = scan(bed, pheno, None, tmp_path, GwasOptions(workers=1, min_maf=0.2, min_mac=150))
    calls = bed.read(0, 400).astype(float)
    calls[calls == MISSING] = np.nan
    calls[:, np.isnan(pheno.values[:, 0])] = np.nan
    count = np.nansum(calls, axis=1)
    called = 2 * np.sum(~np.isnan(calls), axis=1)
    minor = np.minimum(count, called - count)
    expected = (minor / called >= 0.2) & (minor >= 150)
    tested = set(pq.read_table(tmp_path / "results", columns=["id"]).column("id").to_pylist())
    assert tested == set(bed.variants["id"][expected]) and summary.filtered == (~expected).sum() > 0


def test_dead_and_constant_phenotypes_are_left_out_and_recorded(study, tmp_path):
    """A feature that is zero for all but two samples would give meaningless giant t-statistics: it is not
    tested, nor is a constant one; the reasons are in summary.json; inverse_normal keeps the ranks."""
    from scipy import stats

    from endopheno.gwas.phenotypes import Aligned, inverse_normal

    pheno = pd.read_csv(study.parent / "pheno.tsv", sep="\t")
    pheno["dead"] = 0.0
    pheno.loc[[3, 9], "dead"] = [0.2, 0.5]
    pheno["const"] = 1.0
    pheno["age_again"] = 2 * pd.read_csv(study.parent / "covar.tsv", sep="\t")["c0"] + 1   # a covariate in disguise
    pheno[["#FID", "IID", "y0", "dead", "const", "age_again"]].to_csv(tmp_path / "pheno.tsv", sep="\t", index=False,
                                                                      na_rep="NA")
    run = cli("gwas", "--bfile", str(study), "--pheno", str(tmp_path / "pheno.tsv"), "--covar",
              str(study.parent / "covar.tsv"), "--out", str(tmp_path / "out"), "--no-mlflow", "--workers", "1", check=0)
    assert "3 phenotypes not tested" in run.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [row["phenotype"] for row in summary["phenotypes"]] == ["y0"]
    left_out = summary["phenotypes_left_out"]
    assert set(left_out) == {"dead", "const", "age_again"} and "share one value" in left_out["dead"]
    assert left_out["age_again"] == "explained entirely by the covariates"

    y = np.array([[3.0, np.nan], [1.0, 5.0], [2.0, 4.0], [100.0, 6.0]])
    z = inverse_normal(Aligned(y, ["a", "b"])).values
    assert (stats.rankdata(z[:, 0]) == stats.rankdata(y[:, 0])).all() and np.isnan(z[0, 1])
    assert abs(z[:, 0].mean()) < 1e-12 and z[3, 0] == pytest.approx(stats.norm.ppf((4 - 0.375) / 4.25))


def test_qq_points_are_each_phenotypes_sorted_p_values(tmp_path):
    from endopheno.gwas.results import qq_points

    rng = np.random.default_rng(0)
    (tmp_path / "results").mkdir()
    tables = {name: -np.log10(rng.uniform(size=n)) for name, n in (("b", 5000), ("a", 700))}
    rows = pd.DataFrame({"phenotype": np.repeat(list(tables), [len(v) for v in tables.values()]),
                         "log10_p": np.concatenate(list(tables.values())), "reason": None})
    rows = pd.concat([rows, pd.DataFrame({"phenotype": ["a"], "log10_p": [99.0], "reason": ["constant"]})])
    rows.sample(frac=1, random_state=1).to_parquet(tmp_path / "results" / "part-00000.parquet", index=False)
    points = {name: (expected, observed) for name, expected, observed in qq_points(tmp_path, ["a", "b"], max_points=10)}
    assert list(points) == ["a", "b"]
    for name, values in tables.items():
        expected, observed = points[name]
        ranked = np.sort(values)[::-1]           # an untested row (reason) is not a point
        n = len(values)
        assert (len(observed) == n if n <= 2000 else 2000 <= len(observed) <= 3000) and observed[0] == ranked[0] and observed[-1] == ranked[-1]
        np.testing.assert_array_equal(observed[:min(n, 1000)], ranked[:1000])
        assert np.all(np.isin(observed, ranked)) and np.all(np.diff(observed) <= 0)
        assert expected[0] == pytest.approx(-np.log10(0.5 / n)) and expected[-1] == pytest.approx(-np.log10(1 - 0.5 / n))
