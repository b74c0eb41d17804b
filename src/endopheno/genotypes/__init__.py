"""The genotype store: PLINK 1 (.bed) or PLINK 2 (.pgen) genotypes imported into a Zarr array of
dosages with Parquet tables of samples (with genetic principal components) and variants, after
PLINK-style quality control, ready to be streamed by the GWAS in blocks of variants.

Modules: `sources` (readers with one interface), `qc` (call rates, allele frequencies, Hardy-Weinberg),
`pca` (LD pruning, randomised PCA), `ids` (genotyped samples versus imaging subjects), `store` (the
layout and `StoreSource`), `importer` (the whole import).
"""
