"""The volume store: one Zarr v3 hierarchy holding every subject's native volume and the preprocessed
volumes in template space.

    volumes.zarr/
      native/<subject_id>/[ses-<session>/]<modality>   raw array, lossless, + affine, header, source hash
      mni/                                            xarray Dataset: <modality> (subject, x, y, z), ...

A native volume is written in a staging folder beside the store and renamed into place, so a reader
(or a crash) never sees half a volume; the NIfTI it came from can be rebuilt exactly with `read_native`.
After each run the hierarchy's metadata is published as the root's consolidated metadata (`publish`),
which is what `xr.open_zarr` reads: a reader sees the store as of the last completed step.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import zarr

from endopheno.errors import EndophenoError

NATIVE, MNI = "native", "mni"

# Consolidated metadata is a zarr-python extension in format 3; `publish` relies on it for atomic
# visibility and xarray reads it by default. The warning says nothing we do not know.
warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part", category=UserWarning)
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
    if path.exists() and not path.is_dir():
        raise EndophenoError(f"{path}: a file, not a volume store (a folder)")
    if mode in ("r", "r+") and not (path / "zarr.json").exists():
        raise EndophenoError(f"{path}: not a volume store (run `endopheno ingest` first)")
    root = zarr.open_group(str(path), mode=mode, zarr_format=3, use_consolidated=False)
    if mode != "r" and "endopheno" not in root.attrs:
        root.attrs["endopheno"] = {"kind": "volume store", "layout": 1}
    return root


def publish(store: str | Path) -> None:
    """Snapshot the hierarchy's metadata into the root's consolidated metadata, in one atomic write.

    Readers that use it (xarray does by default) see the store as of the last `publish`: new subjects'
    rows and volumes appear all at once, never half added. Writers here read the live hierarchy."""
    zarr.consolidate_metadata(str(store))


def open_group(store: str | Path, path: str, mode: str = "a") -> zarr.Group:
    """A group of the store, read live (not through the consolidated snapshot)."""
    return zarr.open_group(str(store), path=path, mode=mode, zarr_format=3, use_consolidated=False)


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


def native_digest(store: str | Path) -> tuple[str, dict[str, str]]:
    """The native group's content digest and what it is made of: each volume's source sha256 (a volume
    is a lossless copy of its source, so these fix the group)."""
    items = {key.path: attrs["source"]["sha256"] for key, attrs in native_attrs(store).items()}
    return content_digest(items), items


def content_digest(items: dict[str, str], prefix: str = "") -> str:
    """A short digest of named content hashes (order-free), after `prefix` (the parameters that made them)."""
    h = hashlib.sha256(prefix.encode())
    for name, value in sorted(items.items()):
        h.update(f"{name}:{value}\n".encode())
    return h.hexdigest()[:16]


def write_digest_file(path: str | Path, group: str, digest: str, items: dict[str, str]) -> None:
    """Write a group's content digest as a small JSON file, atomically.

    dvc.yaml's stages depend on this file rather than on the group: DVC walks a directory dependency
    once per stage that lists it (thousands of chunk files for each of ten stages made a no-op
    `dvc repro` take 10-15 s), while the group stays one stage's output, walked once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"group": group, "digest": digest, "items": items}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def header_attrs(img: nib.Nifti1Image, header_bytes: bytes) -> dict:
    """What of a NIfTI file is kept beside its voxels: affine, voxel sizes, orientation, scaling, and
    the file's own bytes before the voxels (header, extensions), so that the file can be rebuilt
    byte for byte. (nibabel's in-memory header has its scaling moved to the data proxy, so the bytes
    are taken from the file, not from `img.header`.)"""
    return {
        "affine": img.affine.tolist(),
        "voxel_sizes": [float(z) for z in np.sqrt((img.affine[:3, :3] ** 2).sum(0))],
        "orientation": "".join(nib.aff2axcodes(img.affine)),
        "nifti_class": type(img).__name__,
        "nifti_header": base64.b64encode(header_bytes).decode(),
        "scl_slope": float(getattr(img.dataobj, "slope", 1.0)),
        "scl_inter": float(getattr(img.dataobj, "inter", 0.0)),
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
    """Rebuild the NIfTI image of a native volume array: the original file's header bytes followed by
    the stored voxels, so the image (header, affine, voxels) is the one that was ingested. The file
    `to_bytes` writes is nibabel's re-encoding of it: for scaled data nibabel computes new
    scl_slope/scl_inter, so the bytes (and the voxels, by rounding) can differ from the ingested file."""
    attrs = arr.attrs
    klass = getattr(nib, attrs["nifti_class"])
    header_bytes = base64.b64decode(attrs["nifti_header"])
    header = klass.header_class.from_fileobj(io.BytesIO(header_bytes), check=False)
    voxels = np.asarray(arr[...], dtype=header.get_data_dtype()).tobytes(order="F")
    return klass.from_bytes(header_bytes + voxels)


def scaled(arr: zarr.Array) -> np.ndarray:
    """The native volume's voxel values in float32, with the header's scaling applied."""
    return arr[...].astype(np.float32) * np.float32(arr.attrs["scl_slope"]) + np.float32(arr.attrs["scl_inter"])
