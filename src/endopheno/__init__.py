"""endopheno: a versioned feature store for imaging genetics.

MRI volumes (NIfTI) become chunked Zarr arrays, deep models turn them into imaging endophenotypes in a
versioned Parquet feature store, DuckDB joins them with cohort and genotype data, and a dask-parallel
GWAS tests every endophenotype against every variant. See README.md and DESIGN.md.
"""

from endopheno.errors import EndophenoError, InputError

__version__ = "0.1.0"
__all__ = ["EndophenoError", "InputError", "__version__"]
