"""Stage `genotypes`: PLINK files -> stores/genotypes/<name> (QC'd Zarr dosages, variant and sample
tables with genetic PCs, QC report)."""

from _stage import fail, params, run

FLAGS = {"bed": "bfile", "pgen": "pfile"}

if __name__ == "__main__":
    p = params("genotypes")
    fmt = p.get("format", "bed")
    if fmt not in FLAGS:
        fail(f"params.yaml: genotypes.format is {fmt!r}; use bed (.bed/.bim/.fam) or pgen (.pgen/.pvar/.psam)")
    run("genotypes import", {FLAGS[fmt]: p["source"], "out": p["store"], "subjects": p.get("subjects"),
                             "workers": p.get("workers") or None, "scheduler": params("dask").get("scheduler")})
