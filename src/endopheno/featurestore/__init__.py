"""The feature store: feature sets defined as code (`features/*.yaml`), stored as versioned Delta Lake
tables under `stores/features/<name>`, and exposed with cohort and genotype data through a DuckDB
catalog (`stores/catalog.duckdb`)."""
