"""Reading and validating one NIfTI file, with one clear reason when it is unusable.

The file is read once: its bytes give the content hash and the image, so what is hashed is exactly
what is stored.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from endopheno.errors import InputError

MIN_VOXEL_MM, MAX_VOXEL_MM = 0.1, 10.0
MIN_SHAPE = 8  # fewer voxels than this along an axis is not a brain volume
SINGLE_FILE_MIN_OFFSET = {nib.Nifti1Image: 352, nib.Nifti2Image: 544}  # header + the 4 extension-flag bytes


@dataclass
class Volume:
    """A validated 3D volume: the raw on-disk array (unscaled, in the file's dtype), the image it came
    from (affine and header), and the source file's identity."""

    raw: np.ndarray
    image: nib.Nifti1Image
    header_bytes: bytes  # the file's bytes before the voxels: header, extensions, padding
    sha256: str
    notes: list[str]


def _parse(raw_bytes: bytes, path: Path) -> tuple[nib.Nifti1Image, bytes]:
    if path.name.endswith(".gz"):
        if raw_bytes[:2] != b"\x1f\x8b":
            raise InputError(path, "not a gzip file, though its name ends in .gz")
        try:
            raw_bytes = gzip.decompress(raw_bytes)
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise InputError(path, f"truncated or corrupt gzip data ({_one_line(e)})") from None
    if len(raw_bytes) < 348:
        raise InputError(path, f"not a NIfTI file (only {len(raw_bytes)} bytes)")
    size = int.from_bytes(raw_bytes[:4], "little")
    klass = {348: nib.Nifti1Image, 540: nib.Nifti2Image}.get(size) or {348: nib.Nifti1Image, 540: nib.Nifti2Image}.get(int.from_bytes(raw_bytes[:4], "big"))
    if klass is None:
        raise InputError(path, "not a NIfTI file (bad header size field)")
    try:
        img = klass.from_bytes(raw_bytes)
    except Exception as e:  # noqa: BLE001 - nibabel raises many kinds for a bad header
        raise InputError(path, f"not a valid NIfTI file ({_one_line(e)})") from None
    # The loaded header has vox_offset reset to 0 by nibabel; the file's own header knows where voxels start.
    offset = int(klass.header_class.from_fileobj(io.BytesIO(raw_bytes), check=False)["vox_offset"])
    first = SINGLE_FILE_MIN_OFFSET[klass]
    if offset < first:  # nibabel would read the header's own bytes as voxels
        raise InputError(path, f"vox_offset {offset} lies inside the header (the voxels of a single-file NIfTI start at byte {first} or later)")
    return img, raw_bytes[:offset]


def _one_line(e: Exception) -> str:
    """An exception's message on one line (nibabel's span several)."""
    return " ".join(str(e).split())


def read_volume(path: str | Path) -> Volume:
    """Read and validate a 3D NIfTI-1/2 volume (.nii or .nii.gz).

    A 4D file with a single frame is accepted as 3D (noted); one with several frames is rejected, as
    the volume store holds structural 3D images; so are complex and RGB data. Raises `InputError`
    naming the file and the reason (one line).
    """
    path = Path(path)
    try:
        raw_bytes = path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, "missing file") from None
    except PermissionError:
        raise InputError(path, "permission denied (file not readable)") from None
    except IsADirectoryError:
        raise InputError(path, "is a directory, not a file") from None
    sha256 = hashlib.sha256(raw_bytes).hexdigest()
    img, header_bytes = _parse(raw_bytes, path)
    notes = []

    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        notes.append("4D with one frame, stored as 3D")
    elif len(shape) != 3:
        kind = f"4D volume with {shape[3]} frames" if len(shape) == 4 else f"{len(shape)}D image {shape}"
        raise InputError(path, f"{kind}; expected a 3D volume")
    if min(shape[:3]) < MIN_SHAPE:
        raise InputError(path, f"implausible shape {shape[:3]} for a brain volume")

    affine = img.affine
    if not np.all(np.isfinite(affine)):
        raise InputError(path, "non-finite affine (NaN or Inf in the sform/qform)")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise InputError(path, "singular affine (zero determinant): voxel-to-world mapping is undefined")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    if np.any(zooms < MIN_VOXEL_MM) or np.any(zooms > MAX_VOXEL_MM):
        raise InputError(path, f"absurd voxel size {tuple(round(float(z), 3) for z in zooms)} mm (expected {MIN_VOXEL_MM}-{MAX_VOXEL_MM})")

    dtype = img.get_data_dtype()
    if dtype.kind not in "iuf":  # complex (whose NaNs the check below would not see) or RGB
        raise InputError(path, f"voxel data type {img.header.get_value_label('datatype')} is not a real number type "
                               "(complex or RGB data are not a structural volume)")
    try:
        raw = np.asanyarray(img.dataobj.get_unscaled())
    except Exception as e:  # noqa: BLE001 - a short data block raises from deep inside nibabel
        raise InputError(path, f"truncated or unreadable voxel data ({_one_line(e)})") from None
    raw = raw.reshape(shape[:3])
    if raw.dtype.kind == "f":
        bad = int((~np.isfinite(raw)).sum())
        if bad:
            raise InputError(path, f"{bad} NaN/Inf voxels")
    if not raw.any():
        raise InputError(path, "empty volume (all voxels are zero)")
    if raw.min() == raw.max():
        raise InputError(path, f"constant volume (every voxel is {raw.flat[0]})")
    return Volume(raw=raw, image=img, header_bytes=header_bytes, sha256=sha256, notes=notes)
