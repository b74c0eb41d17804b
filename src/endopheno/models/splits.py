"""Honest evaluation: subject-grouped, stratified, seeded k-fold with an inner validation split, and the
check that fails a run whose split or normalisation leaks.

Every outer fold holds out a test set that nothing else touches: early stopping, model selection (the
patch ranking of ``patch27``), normalisation statistics and baselines see only its training and
validation subjects (Varoquaux et al. 2017, NeuroImage 145:166, "Assessing and tuning brain decoders:
cross-validation, caveats, and guidelines"; Wen et al. 2020, Med. Image Anal. 63:101694, on data
leakage in AD classification with CNNs). Subjects are grouped by participant so that two sessions of
one person never sit on both sides of a split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from endopheno.errors import EndophenoError


class LeakageError(EndophenoError):
    """A split or a fitted statistic lets evaluation subjects into training."""


@dataclass(frozen=True)
class Split:
    """Positions (into a TaskData) of one outer fold's train, validation and test subjects."""

    fold: int
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def pooled_strata(strata: np.ndarray, minimum: int) -> np.ndarray:
    """`strata` with every stratum of fewer than `minimum` subjects pooled into one (and that one, if still
    too small, into the largest). For a model that stratifies only to balance its folds (reconstruction, by
    diagnosis) a rare label, such as three MCI subjects among CN and AD or a scan missing from
    participants.tsv, must not stop the run; a classifier's classes are never pooled."""
    labels, counts = np.unique(strata, return_counts=True)
    small = np.isin(strata, labels[counts < minimum])
    if not small.any():
        return strata
    pooled = np.where(small, labels.max() + 1, strata)
    if small.sum() < minimum:
        pooled[small] = labels[np.argmax(np.where(counts < minimum, -1, counts))]
    return pooled


def outer_folds(groups: np.ndarray, strata: np.ndarray, *, folds: int = 5, validation_fraction: float = 0.2,
                seed: int = 0) -> list[Split]:
    """`folds` outer folds; inside each, about `validation_fraction` of the remaining participants
    become the validation set (itself grouped and stratified). ``folds=1`` is no cross-validation:
    every subject trains or validates (the final model)."""
    index = np.arange(len(groups))
    labels, counts = np.unique(strata, return_counts=True)
    if folds > counts.min():
        raise EndophenoError(f"{folds} folds need at least {folds} subjects in every class or stratum; class or stratum "
                             f"{labels[counts.argmin()]} has {counts.min()}")
    if folds == 1:
        outer = [(index, index[:0])]
    else:
        outer = list(StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(index, strata, groups))
    splits = []
    for k, (rest, test) in enumerate(outer):
        # 1 / validation_fraction inner folds, fewer when a class is too small for that many (tiny cohorts)
        inner_k = max(2, min(round(1 / validation_fraction), int(np.bincount(np.unique(strata[rest], return_inverse=True)[1]).min())))
        inner = StratifiedGroupKFold(inner_k, shuffle=True, random_state=seed + 1 + k)
        fit, validation = next(inner.split(rest, strata[rest], groups[rest]))
        splits.append(Split(k, np.sort(rest[fit]), np.sort(rest[validation]), np.sort(test)))
    return splits


def check_split(split: Split, groups: np.ndarray) -> None:
    """Raise `LeakageError` when a participant is in two of train/validation/test."""
    parts = {"train": set(groups[split.train]), "validation": set(groups[split.validation]),
             "test": set(groups[split.test])}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        shared = parts[a] & parts[b]
        if shared:
            raise LeakageError(f"fold {split.fold}: participant(s) {', '.join(sorted(shared)[:5])} in both {a} and {b}")


def check_normalisation(split: Split, used, training) -> None:
    """Raise `LeakageError` unless the normalisation statistics `used` (what a loader applies: arrays such
    as (mean, SD)) equal `training`, the same statistics fitted afresh on the split's training subjects
    alone. Comparing the values, not a list of subjects the code says it used, catches statistics fitted
    on validation or test subjects by any path."""
    if used is None or len(used) != len(training) or not all(
            np.allclose(np.asarray(u), np.asarray(t), rtol=1e-5, atol=1e-7) for u, t in zip(used, training)):
        raise LeakageError(f"fold {split.fold}: the normalisation statistics applied are not those of the fold's "
                           f"{len(split.train)} training subjects (fitted on validation or test subjects too?)")
