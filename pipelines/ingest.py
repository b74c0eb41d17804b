"""Stage `ingest`: NIfTI files (a BIDS folder or a CSV manifest) -> stores/volumes.zarr native/."""

from _stage import params, run

if __name__ == "__main__":
    p = params("ingest")
    run("ingest", {"store": p["store"], "bids": p.get("bids"), "manifest": p.get("manifest"),
                   "allow_rejected": p.get("allow_rejected", False), "workers": p.get("workers") or None,
                   "scheduler": params("dask").get("scheduler")})
