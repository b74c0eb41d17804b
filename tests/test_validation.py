"""Validation of the chain against planted truth: the counting rules, then a real GWAS scored end to end."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from conftest import cli
from endopheno.genotypes.sources import BedSource
from endopheno.gwas.simulate import write_study
from endopheno.validation import score_loci, validate_set

CAUSAL = pd.DataFrame({"chrom": ["1", "2"], "pos": [1_000_000, 5_000_000], "id": ["1:1000000", "2:5000000"],
                       "region": ["hippocampus_L", "amygdala_L"]})


def loci(*rows):
    return pd.DataFrame(rows, columns=["phenotype", "chrom", "lead_id", "lead_pos", "p"])


def test_a_lead_within_the_window_finds_the_planted_locus_from_any_phenotype():
    table = score_loci(loci(("f017", "1", "1:1400000", 1_400_000, 1e-12)), CAUSAL, window_kb=500)
    planted = table[table["kind"] == "planted"].set_index("planted_variant")
    assert planted.loc["1:1000000", "found"] and planted.loc["1:1000000", "phenotype"] == "f017"
    assert planted.loc["1:1000000", "distance_kb"] == 400
    assert not planted.loc["2:5000000", "found"]
    assert (table["kind"] == "false").sum() == 0


def test_a_lead_beyond_the_window_or_on_another_chromosome_is_a_false_locus():
    table = score_loci(loci(("a", "1", "1:1600000", 1_600_000, 1e-10), ("a", "2", "2:1000000", 1_000_000, 1e-9)),
                       CAUSAL, window_kb=500)
    assert not table[table["kind"] == "planted"]["found"].any()
    assert sorted(table[table["kind"] == "false"]["lead_id"]) == ["1:1600000", "2:1000000"]


def test_one_false_signal_seen_by_several_phenotypes_is_one_locus():
    table = score_loci(loci(("a", "3", "3:100", 100, 1e-9), ("b", "3", "3:300100", 300_100, 1e-11),
                            ("c", "3", "3:2000000", 2_000_000, 1e-9)), CAUSAL, window_kb=500)
    false = table[table["kind"] == "false"].set_index("lead_id")
    assert list(false.index) == ["3:300100", "3:2000000"]      # the strongest lead stands for its locus
    assert false.loc["3:300100", "phenotype"] == "b"


def test_validate_scores_a_real_gwas_and_reports_a_missing_one(tmp_path):
    """A planted variant with a strong effect on the even phenotypes is found, one without effect is not,
    nothing else is found; a set without a GWAS is named, not fatal."""
    prefix = write_study(tmp_path / "study", samples=400, variants=600, phenotypes=2, causal={50: 1.0}, seed=5)
    cli("gwas", "--bfile", str(prefix), "--pheno", str(prefix.parent / "pheno.tsv"), "--covar",
        str(prefix.parent / "covar.tsv"), "--out", str(tmp_path / "gwas" / "toy"), "--no-mlflow", "--workers", "1",
        check=0)
    variants = BedSource(prefix).variants
    planted = variants.iloc[[50, 400]].assign(region=["strong", "silent"])[["chrom", "pos", "id", "region"]]
    planted.to_csv(tmp_path / "causal.tsv", sep="\t", index=False)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"validate": {"gwas": str(tmp_path / "gwas"), "feature_sets": ["toy", "absent"],
                                                   "causal": str(tmp_path / "causal.tsv"), "window_kb": 1,
                                                   "out": str(tmp_path / "validation")}}))
    proc = cli("validate", "--params", str(params), check=0)
    assert "absent" in proc.stderr and "no finished GWAS" in proc.stderr
    metrics = json.loads((tmp_path / "validation" / "metrics.json").read_text())
    assert metrics["toy"]["planted"] == 2 and metrics["toy"]["found"] == 1 and metrics["toy"]["false_loci"] == 0
    assert 0.8 < metrics["toy"]["lambda_gc_median"] < 1.25
    table = pd.read_csv(tmp_path / "validation" / "loci.tsv", sep="\t")
    found = table[(table["kind"] == "planted") & (table["found"] == True)]  # noqa: E712 (a TSV's booleans)
    assert list(found["planted_variant"]) == [variants["id"].iloc[50]] and found["phenotype"].iloc[0] == "y0"
    # The strongest association near each planted variant: the found one's is its lead; the silent one's
    # is there too (a near miss is measured, not NA) and weaker than the study-wide threshold.
    assert found["best_p"].iloc[0] == pytest.approx(found["p"].iloc[0], rel=1e-9)
    missed = table[(table["kind"] == "planted") & (table["found"] == False)]  # noqa: E712
    threshold = json.loads((tmp_path / "validation" / "validation.json").read_text())["feature_sets"]["toy"]["study_wide_threshold"]
    assert threshold < missed["best_p"].iloc[0] <= 1 and missed["best_phenotype"].iloc[0] in ("y0", "y1")
    assert missed["best_p"].iloc[0] <= missed["p_at_variant"].iloc[0] <= 1
    assert found["p_at_variant"].iloc[0] < threshold       # the planted variant itself carries the effect
    assert sorted(p.name for p in (tmp_path / "validation" / "plots").iterdir()) == ["toy_manhattan.png", "toy_qq.png"]


def test_the_study_wide_threshold_counts_only_the_phenotypes_tested(tmp_path):
    """Study-wide = genome-wide / number of phenotypes *tested*. Here 18 of 20 phenotypes are observed on 5
    samples only, too few for the model, so the scan leaves them out: the threshold is 5e-8 / 2, and the
    planted variant's lead (p ~ 9e-9) is found; counting the 18 untested phenotypes (5e-8 / 20) would miss it."""
    prefix = write_study(tmp_path / "study", samples=200, variants=300, phenotypes=20, causal={50: 1.6}, seed=5)
    pheno = pd.read_csv(prefix.parent / "pheno.tsv", sep="\t")
    pheno.loc[5:, [f"y{j}" for j in range(2, 20)]] = float("nan")
    pheno.to_csv(prefix.parent / "pheno.tsv", sep="\t", index=False, na_rep="NA")
    cli("gwas", "--bfile", str(prefix), "--pheno", str(prefix.parent / "pheno.tsv"), "--covar",
        str(prefix.parent / "covar.tsv"), "--out", str(tmp_path / "gwas" / "toy"), "--no-mlflow", "--workers", "1",
        check=0)
    summary = json.loads((tmp_path / "gwas" / "toy" / "summary.json").read_text())
    assert [p["phenotype"] for p in summary["phenotypes"]] == ["y0", "y1"] and len(summary["phenotypes_left_out"]) == 18
    lead = pd.read_parquet(tmp_path / "gwas" / "toy" / "loci.parquet").set_index("phenotype").loc["y0"]
    assert 5e-8 / 20 < lead["p"] < 5e-8 / 2
    planted = BedSource(prefix).variants.iloc[[50]].assign(region="strong")[["chrom", "pos", "id", "region"]]
    s, table = validate_set(tmp_path / "gwas" / "toy", planted, window_kb=1)
    assert s["phenotypes"] == 2 and s["study_wide_threshold"] == pytest.approx(5e-8 / 2)
    assert s["found"] == 1 and s["false_loci"] == 0
