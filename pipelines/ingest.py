"""Stage `ingest`: NIfTI files (a BIDS folder or a CSV manifest) -> stores/volumes.zarr native/."""

from pathlib import Path

from _stage import params, run

if __name__ == "__main__":
    p = params("ingest")
    kind = "manifest" if Path(p["source"]).suffix.lower() == ".csv" else "bids"
    run("ingest", {"store": p["store"], kind: p["source"],
                   "allow_rejected": p.get("allow_rejected", False), "digest_file": p.get("digest"),
                   "workers": p.get("workers") or None,
                   "scheduler": params("dask").get("scheduler")})
