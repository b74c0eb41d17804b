"""Stage `extract_atlas`: the MNI volume store -> the atlas-region feature set (a new Delta version of
stores/features/atlas_regions, or none when its inputs are unchanged)."""

from _stage import params, run

if __name__ == "__main__":
    run("features build atlas_regions", {"scheduler": params("dask").get("scheduler")})
