"""Volumes: NIfTI files -> the Zarr volume store (native and template space)."""
