"""Stage `catalog`: rebuild stores/catalog.duckdb (SQL views over the feature, cohort, genotype and
GWAS stores) from params.yaml's `catalog` section."""

from _stage import run

if __name__ == "__main__":
    run("catalog", {})
