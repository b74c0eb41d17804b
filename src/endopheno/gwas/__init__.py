"""Genome-wide association of many phenotypes at once: linear regression of every phenotype on every
variant with covariates, exact like PLINK 2's ``--glm`` and streamed over blocks of variants."""
