"""Quality-control outputs of preprocessing: a per-subject table and a montage to look at."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import xarray as xr  # noqa: E402


def mean_displacement(a: np.ndarray, b: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> float:
    """Mean distance (mm) between where two 4x4 affines send the voxel centres of `mask` (a grid with
    `affine`): how far apart two registrations put the brain, e.g. a recovered pose and the truth."""
    pts = affine[:3, :3] @ np.argwhere(mask).T + affine[:3, 3:4]
    return float(np.linalg.norm((a[:3, :3] - b[:3, :3]) @ pts + (a[:3, 3:4] - b[:3, 3:4]), axis=0).mean())


def qc_table(ds: xr.Dataset) -> pd.DataFrame:
    """One row per subject: correlation with the template, pass/fail, note, and ``etiv_mm3``.

    ``etiv_mm3`` is the estimated total intracranial volume of the atlas-scaling-factor method (Buckner et
    al. 2004, NeuroImage 23:724): the template's brain-mask volume carried into the subject by the affine
    registration, ``V_template × |det A|`` (A: the linear part of template→native). Imaging GWAS of brain
    volumes take head size as a covariate (ENIGMA; Hibar et al. 2015, Nature 520:224): it is a large
    share of a region's volume variance that has nothing to do with the region. Assumes the affine
    registration succeeded (see ``qc_pass``); empty for a subject not yet preprocessed."""
    affine = np.asarray(ds.attrs["affine"])
    template_mm3 = float(np.asarray(ds["brain_mask"].values, dtype=bool).sum()) * abs(np.linalg.det(affine[:3, :3]))
    linear = np.asarray(ds["template_to_native"].values)[:, :3, :3]
    done = np.array([bool(s) for s in ds["source_sha256"].values.tolist()])
    etiv = np.full(len(done), np.nan)
    etiv[done] = template_mm3 * np.abs(np.linalg.det(linear[done]))  # (a row not done is NaN: no det of it)
    return pd.DataFrame({
        "subject": [str(s) for s in ds["subject"].values], "qc_correlation": ds["qc_correlation"].values.round(4),
        "qc_pass": ds["qc_pass"].values, "note": [str(s) for s in ds["note"].values], "etiv_mm3": etiv.round(1),
    })


def montage(ds: xr.Dataset, out: str | Path, modality: str = "T1w", n: int = 12) -> Path:
    """Mid axial, coronal and sagittal slices of `n` subjects (the worst QC first, then evenly spread),
    with the template's brain outline on top, so misregistration shows as a shifted contour. With no
    preprocessed subject (every one failed) the figure says so."""
    corr = ds["qc_correlation"].values
    done = np.flatnonzero(np.isfinite(corr))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if done.size == 0:
        fig = plt.figure(figsize=(6.0, 1.0))
        fig.text(0.5, 0.5, f"no {modality} volume preprocessed yet ({ds.sizes['subject']} subjects, none done)", ha="center", va="center")
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out
    order = done[np.argsort(corr[done])]
    worst = list(order[: max(1, n // 3)])
    spread = dict.fromkeys(order[np.linspace(0, len(order) - 1, n).astype(int)].tolist())  # fewer subjects than n: repeats
    rest = [i for i in spread if i not in worst]
    picks = (worst + rest)[:n]
    mask = ds["brain_mask"].values.astype(float)
    mid = [s // 2 for s in mask.shape]
    cuts = [("axial", lambda v: v[:, :, mid[2]]), ("coronal", lambda v: v[:, mid[1], :]), ("sagittal", lambda v: v[mid[0], :, :])]
    # constrained layout leaves room for the suptitle, which tight_layout drew over the column titles
    fig, axes = plt.subplots(len(picks), 3, figsize=(6.0, 2.0 * len(picks)), squeeze=False, layout="constrained")
    for row, i in enumerate(picks):
        vol = ds[modality].isel(subject=int(i)).values
        for col, (name, cut) in enumerate(cuts):
            ax = axes[row, col]
            ax.imshow(cut(vol).T, origin="lower", cmap="gray", vmin=-2.5, vmax=2.5)
            ax.contour(cut(mask).T, levels=[0.5], colors="tab:red", linewidths=0.6)
            ax.set_xticks([]), ax.set_yticks([])
            if col == 0:
                ok = "pass" if bool(ds["qc_pass"].values[i]) else "FLAGGED"
                ax.set_ylabel(f"{ds['subject'].values[i]}\nr={corr[i]:.3f} {ok}", fontsize=7)
            if row == 0:
                ax.set_title(name, fontsize=8)
    fig.suptitle(f"{modality} in MNI space, template brain outline in red", fontsize=9)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
