"""What a model reads: the subjects of a task with their targets, and a Zarr-backed torch Dataset.

A model sees the MNI volume store (``mni/<modality>``, subjects × x × y × z, already z-scored inside the
brain mask) average-pooled to the model's resolution (``resolution_mm``; the demo trains at 4 mm on
2 mm volumes). Input maps are channels: a modality of the store (``T1w``) or ``gm``, the soft grey-
matter probability of the pooled T1 (the Gaussian mixture of the atlas features), so that networks
with one branch per map (``inception3d``) can see T1 and grey matter separately.

Targets come from the cohort's participants table (BIDS ``participants.tsv``): the diagnosis for
classification (``classes``: negative first, positive last; other labels are left out and reported),
a numeric column (age) for regression, none for reconstruction.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from endopheno.errors import InputError

log = logging.getLogger(__name__)
TASKS = ("classification", "regression", "reconstruction")


@dataclass(frozen=True)
class TaskData:
    """The subjects a task trains and is evaluated on.

    ``rows`` index the store's subject axis; ``groups`` are participants (a subject scanned in two
    sessions is one group, so both scans land in the same fold); ``target`` is the class index (0/1),
    the numeric target, or NaN for reconstruction; ``strata`` is what folds are balanced on.
    """

    task: str
    rows: np.ndarray
    subjects: np.ndarray
    groups: np.ndarray
    target: np.ndarray
    strata: np.ndarray
    diagnosis: np.ndarray
    excluded: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def digest(self) -> str:
        """sha256 of who is trained on what: subjects, participants, targets and strata."""
        h = hashlib.sha256()
        for a in (self.subjects, self.groups, self.target, self.strata):
            h.update("\t".join(np.asarray(a).astype(str)).encode() + b"\n")
        return h.hexdigest()


def participant_table(path: str | Path) -> pd.DataFrame:
    """participants.tsv indexed by subject_id (``sub-`` removed)."""
    try:
        table = pd.read_csv(path, sep="\t", dtype={"participant_id": str})
    except FileNotFoundError:
        raise InputError(path, "no such participants table") from None
    if "participant_id" not in table:
        raise InputError(path, "has no participant_id column")
    table["subject_id"] = table.participant_id.str.removeprefix("sub-")
    return table.set_index("subject_id")


def task_data(ds, participants: str | Path, task: str, *, target: str = "diagnosis",
              classes: tuple[str, str] = ("CN", "AD"), covariates: tuple[str, ...] = ()) -> TaskData:
    """Select the store's subjects usable for `task` and attach their targets.

    A subject is used when its MNI volume is finished, it passed preprocessing QC and it has a valid
    target and every one of `covariates`; every other one is listed in ``excluded`` with the reason
    (never silently dropped).
    """
    from endopheno.volumes.preprocess import split_row_label

    if task not in TASKS:
        raise InputError(task, f"unknown task (known: {', '.join(TASKS)})")
    table = participant_table(participants)
    if task != "reconstruction" and target not in table:
        raise InputError(participants, f"has no {target!r} column for the {task} target")
    for c in covariates:
        if c not in table:
            raise InputError(participants, f"has no {c!r} column for the covariate {c!r}")
    keys = np.array(ds.subject.values.tolist(), dtype=str)
    done = np.array(ds.source_sha256.values.tolist(), dtype=str) != ""
    qc = np.asarray(ds.qc_pass.values, dtype=bool)
    rows, targets, excluded = [], [], []
    for i, key in enumerate(keys):
        subject = split_row_label(key)[0]
        if not done[i]:
            excluded.append((key, "not preprocessed"))
            continue
        if not qc[i]:
            excluded.append((key, "failed preprocessing QC"))
            continue
        if subject not in table.index:
            if task == "reconstruction":
                rows.append(i), targets.append(math.nan)
            else:
                excluded.append((key, f"not in {Path(participants).name}"))
            continue
        if missing := [c for c in covariates if pd.isna(table.at[subject, c])]:
            excluded.append((key, f"{', '.join(missing)} missing"))
            continue
        value = table.at[subject, target] if target in table else None
        if task == "classification":
            if value not in classes:
                excluded.append((key, f"{target} {value!r} is not one of {', '.join(classes)}"))
                continue
            value = float(classes.index(value))
        elif task == "regression":
            value = pd.to_numeric(value, errors="coerce")
            if not np.isfinite(value):
                excluded.append((key, f"{target} is missing"))
                continue
        else:
            value = math.nan
        rows.append(i), targets.append(float(value))
    rows = np.asarray(rows, dtype=np.int64)
    subjects = keys[rows]
    groups = np.array([split_row_label(s)[0] for s in subjects])
    diagnosis = np.array([str(table.at[g, "diagnosis"]) if g in table.index and "diagnosis" in table else ""
                          for g in groups])
    target_values = np.asarray(targets, dtype=np.float64)
    if task == "classification":
        strata = target_values.astype(int)
    elif task == "regression":
        # quintiles of the target, so every fold spans its range
        strata = np.searchsorted(np.quantile(target_values, [0.2, 0.4, 0.6, 0.8]), target_values)
    else:
        strata = pd.factorize(diagnosis)[0]
    for key, reason in excluded:
        log.info("left out %s: %s", key, reason)
    if len(rows) < 10:
        raise InputError(participants, f"only {len(rows)} subjects usable for {task} (need at least 10)")
    return TaskData(task, rows, subjects, groups, target_values, strata, diagnosis, excluded)


NON_FINITE = "its MNI volume has non-finite voxels"


def finite(x: torch.Tensor) -> torch.Tensor:
    """[B] bool: the volumes of a batch whose voxels are all finite (NaN marks a row never preprocessed);
    extraction and attribution report the others as NON_FINITE and go on with the rest."""
    return torch.isfinite(x).flatten(1).all(1)


def pool_factor(store_voxel_mm: float, resolution_mm: float | None) -> int:
    """The average-pooling factor from the store's grid to the model's (1 = the store's resolution)."""
    if not resolution_mm:
        return 1
    factor = resolution_mm / store_voxel_mm
    if factor < 1 or abs(factor - round(factor)) > 1e-6:
        raise InputError(f"resolution_mm {resolution_mm}", f"must be a whole multiple of the store's {store_voxel_mm:g} mm")
    return int(round(factor))


def pool(volumes: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool [..., X, Y, Z] by `factor` (edges: partial windows are averaged over what they hold)."""
    if factor == 1:
        return volumes
    shape = volumes.shape
    x = volumes.reshape(-1, 1, *shape[-3:])
    x = F.avg_pool3d(x, factor, ceil_mode=True, count_include_pad=False)
    return x.reshape(*shape[:-3], *x.shape[-3:])


def highpass(x: torch.Tensor, mask: torch.Tensor, sigma_voxels: float) -> torch.Tensor:
    """[..., X, Y, Z] maps minus their Gaussian-smoothed copy (SD `sigma_voxels`), inside `mask`, 0 outside.

    The smoothing is normalised by the smoothed mask (the mean of the brain voxels near each voxel, so the
    brain's edge is not pulled toward the zeros outside it). What is left is local: a region's change
    against its surroundings, without the smooth, brain-wide variation (head shape left by the affine
    step, lobar size, a random warp) that otherwise takes the largest share of every reconstruction
    code's dimensions (BENCHMARKS.md, "Is it the grid, or the objective?"). Differentiable (a separable
    convolution), so attribution through it reaches the unfiltered input."""
    from monai.networks.layers import GaussianFilter

    # MONAI's separable filter, zero-padded and truncated at 3 SD like scipy's; its sampled kernel is not
    # normalised, which the division by the smoothed mask cancels.
    smooth = GaussianFilter(3, sigma_voxels, truncated=3.0, approx="sampled").to(x.device, x.dtype)
    m = mask.to(x.dtype)
    shape = x.shape
    x = x.reshape(-1, 1, *shape[-3:])
    m = m.expand_as(x)
    return ((x - smooth(x * m) / smooth(m).clamp_min(1e-6)) * m).reshape(shape)


def midline_of(affine: np.ndarray) -> float:
    """The voxel coordinate along array axis 0 of the plane x = 0 (the template's midline) of an
    axis-aligned grid affine; what `bilateral` reflects about."""
    a = np.asarray(affine, dtype=np.float64)
    if a[0, 0] == 0 or np.any(a[0, 1:3] != 0) or np.any(a[1:3, 0] != 0):
        raise InputError("bilateral", "the grid's array axis 0 must be the x (left-right) axis of its affine")
    return float(-a[0, 3] / a[0, 0])


def bilateral(x: torch.Tensor, midline: float) -> torch.Tensor:
    """[..., X, Y, Z] maps averaged with their left-right mirror image about voxel coordinate `midline` of
    axis X (linear between voxels where the mirror point falls between two; 0 beyond the grid): the part of
    each map the two hemispheres share. For a disease whose atrophy is bilateral (AD) this halves the
    variance of whatever is independent between the hemispheres (on the phantom: cnn3d BA +0.04;
    BENCHMARKS.md, "Mirror symmetry"); it removes exactly what a lateralised endophenotype measures, so it
    is for classifiers, not for the autoencoder. Linear, so attribution through it reaches both sides."""
    n = x.shape[-3]
    position = 2 * midline - torch.arange(n, dtype=torch.float64)
    low = torch.floor(position)
    w = (position - low).to(x.dtype).view(-1, 1, 1)

    def at(i: torch.Tensor) -> torch.Tensor:
        inside = ((i >= 0) & (i < n)).to(x.dtype).view(-1, 1, 1)
        return x.index_select(-3, i.clamp(0, n - 1)) * inside

    low = low.long()
    return (x + (1 - w) * at(low) + w * at(low + 1)) / 2


def filtered(x: torch.Tensor, mask: torch.Tensor, highpass_voxels: float | None = None,
             midline: float | None = None) -> torch.Tensor:
    """The maps as a model reads them before normalisation: high-passed (`highpass`), then bilateral
    (`bilateral`), where the model's knobs ask for it. One function for the loader and the registered
    model, so that extraction and attribution read what training read."""
    if highpass_voxels:
        x = highpass(x, mask, highpass_voxels)
    return bilateral(x, midline) * mask if midline is not None else x


def brain_mask(ds, factor: int) -> torch.Tensor:
    """The template brain mask at the model's resolution (a pooled voxel is brain when mostly brain)."""
    return pool(torch.as_tensor(np.asarray(ds.brain_mask.values), dtype=torch.float32), factor) > 0.5


def grey_matter(t1: torch.Tensor, mask: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Soft grey-matter map of a pooled T1 volume: P(GM | intensity) inside the mask, 0 outside."""
    from endopheno.featurestore.atlas import soft_grey_matter

    out = torch.zeros_like(t1)
    out[mask] = torch.as_tensor(soft_grey_matter(t1[mask].numpy(), seed), dtype=t1.dtype)
    return out


class VolumeDataset(torch.utils.data.Dataset):
    """Subjects of the Zarr volume store as [C, X, Y, Z] tensors at the model's resolution.

    Each item is read from its own Zarr chunk (one subject per chunk), so DataLoader workers read in
    parallel and prefetch ahead of the model; nothing is held in memory between items. ``normalise``
    (mean and SD, per channel or per voxel, fitted on training subjects only) and ``augment`` (a MONAI
    transform) are applied in the worker; ``highpass_voxels`` (`highpass`) and ``midline`` (`bilateral`) are
    part of the volume itself, as is ``adjust`` ((design [N, K] of `rows`, effects): the covariate effects,
    fitted on the unfiltered maps, removed before the filters; `adjusted`).
    ``volumes`` ([N, C, X, Y, Z], what `volume` returns for `rows`, read before) serves the items from
    memory instead: for training, which passes over the same subjects every epoch.
    """

    def __init__(self, store: str | Path, rows: np.ndarray, targets: np.ndarray, *, inputs: tuple[str, ...] = ("T1w",),
                 factor: int = 1, mask: torch.Tensor | None = None, normalise: tuple[torch.Tensor, torch.Tensor] | None = None,
                 augment=None, highpass_voxels: float | None = None, midline: float | None = None,
                 adjust: tuple[np.ndarray, torch.Tensor] | None = None, volumes: torch.Tensor | None = None):
        self.store, self.rows, self.targets = str(store), np.asarray(rows), np.asarray(targets, dtype=np.float32)
        self.inputs, self.factor, self.mask = tuple(inputs), factor, mask
        self.normalise, self.augment, self.highpass_voxels, self.midline = normalise, augment, highpass_voxels, midline
        self.adjust = adjust if adjust is not None and adjust[1] is not None else None
        if volumes is not None and len(volumes) != len(self.rows):
            raise ValueError(f"{len(volumes)} volumes for {len(self.rows)} rows")
        self.volumes = volumes
        self._group = None  # opened lazily, once per worker process

    def __len__(self) -> int:
        return len(self.rows)

    def volume(self, index: int) -> torch.Tensor:
        if self.volumes is not None:
            return self.volumes[index]
        import zarr

        if self._group is None:
            self._group = zarr.open_group(self.store, mode="r", path="mni")
        row = int(self.rows[index])
        channels = {}
        for name in self.inputs:
            source = "T1w" if name == "gm" else name
            if source not in channels:
                channels[source] = pool(torch.from_numpy(np.asarray(self._group[source][row], dtype=np.float32)), self.factor)
        out = torch.stack([grey_matter(channels["T1w"], self.mask) if name == "gm" else channels[name] for name in self.inputs])
        if self.adjust is not None:  # before the filters, which are linear: effects are fitted on unfiltered maps
            out = adjusted(out[None], self.adjust[0][index:index + 1], self.adjust[1])[0]
        return filtered(out, self.mask, self.highpass_voxels, self.midline)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.volume(index)
        if self.normalise is not None:
            mean, sd = self.normalise
            x = (x - mean) / sd
            if self.mask is not None:
                x = x * self.mask
        if self.augment is not None:
            x = torch.as_tensor(self.augment(x), dtype=torch.float32)
        return x, torch.tensor(self.targets[index])


def fit_normalisation(volumes: torch.Tensor, mask: torch.Tensor, per: str = "map") -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and SD of `volumes` [N, C, X, Y, Z] (pass the training subjects only: statistics fitted on
    validation or test subjects leak them into training). `per` = "map": one mean and SD per channel over
    its brain voxels, shaped [C, 1, 1, 1]; "voxel": each voxel's own over the subjects, [C, X, Y, Z]
    (every voxel then weighs the same in a loss, whatever its variance, as in the SVM baseline)."""
    if per == "voxel":
        v = volumes.double()
        sd = torch.where(mask, v.std(0, unbiased=False), 1.0).clamp_min(1e-6)
        return (v.mean(0) * mask).float(), sd.float()
    if per != "map":
        raise InputError(f"normalisation {per!r}", "must be map or voxel")
    v = volumes[:, :, mask].double().transpose(0, 1).reshape(volumes.shape[1], -1)
    return v.mean(1).float()[:, None, None, None], v.std(1, unbiased=False).clamp_min(1e-6).float()[:, None, None, None]


def covariate_design(table: pd.DataFrame, names, levels: dict | None = None) -> tuple[np.ndarray, dict]:
    """The [N, K] design of the covariates `names` for the participants (rows) of `table`: a numeric column
    as it is, a text column (sex, site) as indicators of its levels after the first, and `levels` the
    coding ({name: [levels]}, [] for numeric). Give the training subjects' `levels` to code other subjects
    alike. A missing value, or a level the coding does not know, is an error naming the participant."""
    levels, columns = dict(levels or {}), []
    for name in names:
        values = table[name]
        if missing := values.index[values.isna()].tolist():
            raise InputError(f"participant {missing[0]}", f"has no {name} ({len(missing)} participant(s) without)")
        if name not in levels:
            numeric = pd.to_numeric(values, errors="coerce")
            levels[name] = [] if numeric.notna().all() else sorted(values.astype(str).unique())
        if not levels[name]:
            columns.append(pd.to_numeric(values).to_numpy(np.float64)[:, None])
            continue
        text = values.astype(str)
        if unknown := text.index[~text.isin(levels[name])].tolist():
            raise InputError(f"participant {unknown[0]}", f"{name} {text[unknown[0]]!r} is none of the training "
                             f"subjects' ({', '.join(levels[name])})")
        columns.append(np.stack([(text == level).to_numpy(np.float64) for level in levels[name][1:]], 1))
    return (np.concatenate(columns, 1) if columns else np.zeros((len(table), 0))), levels


def covariate_effects(volumes: torch.Tensor, design: np.ndarray, reference: np.ndarray) -> torch.Tensor:
    """Each voxel's linear effect of the covariates: least squares of the maps `volumes` [N, C, X, Y, Z]
    on an intercept and `design` [N, K], over the `reference` rows; returns the slopes [K, C, X, Y, Z].

    The age correction of Dukart et al. (2011, PLoS ONE 6:e22193, "Age correction in dementia — matching
    to a healthy brain"): fitted in the healthy controls of the training subjects, so that atrophy of the
    disease is not taken for that of age, and removed from every subject (`adjusted`), each map then reads
    as its difference from a healthy brain of the same age. Assumes the effects are linear and the same in
    patients as in controls. On the phantom (age: 0.2-2% of a region's volume per year) it lifts cnn3d and
    its SVM baseline above BA 0.90 (BENCHMARKS.md, "Age correction")."""
    flat = volumes[reference].flatten(1).double().numpy()
    x = np.column_stack([np.ones(len(reference)), design[reference]])
    beta, *_ = np.linalg.lstsq(x, flat, rcond=None)
    return torch.from_numpy(beta[1:]).float().reshape(design.shape[1], *volumes.shape[1:])


def adjusted(volumes: torch.Tensor, design: np.ndarray, effects: torch.Tensor | None) -> torch.Tensor:
    """`volumes` [N, C, X, Y, Z] minus their rows' covariate effects (`covariate_effects`); None: as they are."""
    if effects is None:
        return volumes
    return volumes - torch.einsum("nk,k...->n...", torch.as_tensor(design, dtype=volumes.dtype), effects.to(volumes.dtype))


def augmentation(options: dict | None, seed: int):
    """A MONAI transform from the `augment` knobs (None when all are off).

    ``affine_prob`` (random rotation up to ``rotate_deg`` and translation up to ``translate_vox``),
    ``flip_prob`` (left-right: off by default, since the phantom's and real brains' genetic effects are
    lateralised and a flip would mix the hemispheres), ``noise_sd``, ``bias_prob`` (a smooth
    multiplicative bias field).
    """
    from monai.transforms import Compose, RandAffine, RandBiasField, RandFlip, RandGaussianNoise

    o = {"affine_prob": 0.0, "rotate_deg": 5.0, "translate_vox": 2.0, "flip_prob": 0.0, "noise_sd": 0.0,
         "bias_prob": 0.0, **(options or {})}
    unknown = set(o) - {"affine_prob", "rotate_deg", "translate_vox", "flip_prob", "noise_sd", "bias_prob"}
    if unknown:
        raise InputError("augment", f"unknown option(s) {', '.join(sorted(unknown))}")
    transforms = []
    if o["affine_prob"] > 0:
        angle = math.radians(o["rotate_deg"])
        transforms.append(RandAffine(prob=o["affine_prob"], rotate_range=(angle,) * 3,
                                     translate_range=(o["translate_vox"],) * 3, padding_mode="zeros"))
    if o["flip_prob"] > 0:
        transforms.append(RandFlip(prob=o["flip_prob"], spatial_axis=0))
    if o["noise_sd"] > 0:
        transforms.append(RandGaussianNoise(prob=1.0, std=o["noise_sd"]))
    if o["bias_prob"] > 0:
        transforms.append(RandBiasField(prob=o["bias_prob"], coeff_range=(0.0, 0.1)))
    if not transforms:
        return None
    compose = Compose(transforms)
    compose.set_random_state(seed=seed)
    return compose
