"""Stage `validate`: every feature set's GWAS against the phantom's planted variants (loci found, false
loci, λGC) -> validate.out: validation.json, loci.tsv, metrics.json (DVC metrics), plots/ (DVC plots)."""

from _stage import run

if __name__ == "__main__":
    run("validate", {})
