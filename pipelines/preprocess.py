"""Stage `preprocess`: native volumes -> stores/volumes.zarr mni/, plus stores/qc (table and montage)."""

from _stage import params, run

if __name__ == "__main__":
    p = params("preprocess")
    run("preprocess", {"store": p["store"], "qc_dir": p["qc_dir"], "digest_file": p.get("digest"), "workers": p.get("workers") or None,
                       "scheduler": params("dask").get("scheduler")})
