"""Stage `gwas@SET`: the analysis cohort of feature set SET (the catalog's join of its latest version with
QC, covariates, genotyped samples and PCs) against every variant of the genotype store; results, loci,
plots and summary in gwas.out/SET, recorded in MLflow."""

import sys

from _stage import params, run

if __name__ == "__main__":
    name = sys.argv[1]
    run("gwas", {"feature_set": name, "out": f"{params('gwas')['out']}/{name}",
                 "scheduler": params("dask").get("scheduler")})
