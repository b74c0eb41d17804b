"""The volume store: one Zarr v3 hierarchy holding every subject's native volume and the preprocessed
volumes in template space.

    volumes.zarr/
      native/<subject_id>/[ses-<session>/]<modality>   raw array, lossless, + affine, header, source hash
      mni/                                            xarray Dataset: <modality> (subject, x, y, z), ...

A native volume is written in a staging folder beside the store and renamed into place, so a reader
(or a crash) never sees half a volume; the NIfTI it came from can be rebuilt exactly with `read_native`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import zarr

from endopheno.errors import EndophenoError

NATIVE, MNI = "native", "mni"
CHUNK = (64, 64, 64)


@dataclass(frozen=True)
class ScanKey:
    """Which volume: subject, optional session, modality (BIDS suffix such as T1w)."""

    subject_id: str
    session: str | None = None
    modality: str = "T1w"

    @property
    def path(self) -> str:
        ses = f"/ses-{self.session}" if self.session else ""
        return f"{NATIVE}/{self.subject_id}{ses}/{self.modality}"

    def __str__(self) -> str:
        ses = f" session {self.session}" if self.session else ""
        return f"subject {self.subject_id}{ses} {self.modality}"


def open_store(path: str | Path, mode: str = "a") -> zarr.Group:
    """Open (or create, with mode "a") the volume store's root group."""
    path = Path(path)
    if mode == "r" and not (path / "zarr.json").exists():
        raise EndophenoError(f"{path}: not a volume store (run `endopheno ingest` first)")
    root = zarr.open_group(str(path), mode=mode, zarr_format=3)
    if mode != "r" and "endopheno" not in root.attrs:
        root.attrs["endopheno"] = {"kind": "volume store", "layout": 1}
    return root


def _staging(store: Path) -> Path:
    return store.with_name(store.name + ".staging")


def clean_staging(store: str | Path) -> None:
    """Remove what a crashed run left half-written beside the store."""
    shutil.rmtree(_staging(Path(store)), ignore_errors=True)


def write_native(store: str | Path, key: ScanKey, raw: np.ndarray, attrs: dict) -> None:
    """Write one native volume atomically: build it beside the store, then rename it into place."""
    store = Path(store)
    staging = _staging(store) / uuid.uuid4().hex
    staging.parent.mkdir(parents=True, exist_ok=True)
    arr = zarr.create_array(str(staging), shape=raw.shape, dtype=raw.dtype, chunks=tuple(min(c, s) for c, s in zip(CHUNK, raw.shape)),
                            attributes=attrs, zarr_format=3)
    arr[...] = raw
    final = store / key.path
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # a changed source: swap, so the old volume stays whole until the new one is in
        trash = _staging(store) / f"old-{uuid.uuid4().hex}"
        os.rename(final, trash)
        os.rename(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(staging, final)


def ensure_groups(store: str | Path, keys) -> None:
    """Create the group metadata of every subject (and session) of `keys`, before workers write."""
    root = open_store(store)
    native = root.require_group(NATIVE)
    for key in keys:
        g = native.require_group(key.subject_id)
        if key.session:
            g.require_group(f"ses-{key.session}")


def iter_native(store: str | Path) -> Iterator[tuple[ScanKey, zarr.Array]]:
    """Every native volume in the store, in sorted order."""
    root = open_store(store, mode="r")
    if NATIVE not in root:
        return
    native = root[NATIVE]
    for subject_id in sorted(native.group_keys()):
        subject = native[subject_id]
        for name, node in sorted(subject.members()):
            if isinstance(node, zarr.Array):
                yield ScanKey(subject_id, None, name), node
            else:
                for modality, arr in sorted(node.arrays()):
                    yield ScanKey(subject_id, name.removeprefix("ses-"), modality), arr


def native_attrs(store: str | Path) -> dict[ScanKey, dict]:
    """Attributes of every native volume (its source file, hash, affine...), by key."""
    if not (Path(store) / "zarr.json").exists():
        return {}
    return {key: dict(arr.attrs) for key, arr in iter_native(store)}


def header_attrs(img: nib.Nifti1Image) -> dict:
    """What of a NIfTI image is kept beside its voxels: affine, voxel sizes, orientation, the whole
    binary header and its extensions, so that the file can be rebuilt exactly."""
    hdr = img.header
    slope, inter = hdr.get_slope_inter()
    return {
        "affine": img.affine.tolist(),
        "voxel_sizes": [float(z) for z in np.sqrt((img.affine[:3, :3] ** 2).sum(0))],
        "orientation": "".join(nib.aff2axcodes(img.affine)),
        "nifti_class": type(img).__name__,
        "nifti_header": base64.b64encode(hdr.binaryblock).decode(),
        "nifti_extensions": [{"code": int(e.get_code()), "content": base64.b64encode(e.content).decode()} for e in hdr.extensions],
        "scl_slope": None if slope is None or not np.isfinite(slope) else float(slope),
        "scl_inter": None if inter is None or not np.isfinite(inter) else float(inter),
    }


def read_native(store: str | Path, subject_id: str, modality: str = "T1w", session: str | None = None) -> nib.Nifti1Image:
    """The native volume as the NIfTI image it was ingested from: same voxels, affine and header."""
    key = ScanKey(subject_id, session, modality)
    root = open_store(store, mode="r")
    try:
        arr = root[key.path]
    except KeyError:
        raise EndophenoError(f"{store}: no volume for {key}") from None
    return image_from(arr)


def image_from(arr: zarr.Array) -> nib.Nifti1Image:
    """Rebuild the NIfTI image of a native volume array."""
    attrs = arr.attrs
    klass = getattr(nib, attrs["nifti_class"])
    header = klass.header_class(base64.b64decode(attrs["nifti_header"]))
    raw = arr[...]
    header.set_data_shape(raw.shape)  # a single-frame 4D file was stored as 3D
    for ext in attrs.get("nifti_extensions", []):
        header.extensions.append(nib.nifti1.Nifti1Extension(ext["code"], base64.b64decode(ext["content"])))
    img = klass(raw, np.asarray(attrs["affine"]), header=header)
    img.header.set_slope_inter(attrs["scl_slope"], attrs["scl_inter"])
    return img


def scaled(arr: zarr.Array) -> np.ndarray:
    """The native volume's voxel values in float32, with the header's scaling applied."""
    data = arr[...].astype(np.float32)
    slope, inter = arr.attrs.get("scl_slope"), arr.attrs.get("scl_inter")
    if slope not in (None, 0.0):
        data = data * np.float32(slope) + np.float32(inter or 0.0)
    return data


def digest(store: str | Path) -> str:
    """Content digest of the native volumes: a hash over every (key, source sha256). Two stores with the
    same digest hold the same data, whatever their paths or ingestion times."""
    h = hashlib.sha256()
    for key, attrs in sorted(native_attrs(store).items(), key=lambda kv: kv[0].path):
        h.update(json.dumps([key.path, attrs["source"]["sha256"]]).encode())
    return h.hexdigest()
