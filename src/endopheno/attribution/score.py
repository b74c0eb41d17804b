"""Attribution maps scored against a ground-truth map, and the activation pattern of a linear model.

The phantom cohort's truth is an atrophy map (larger = more atrophy, 0 where there is none). Every score
is computed over the voxels inside the brain mask, and ranks voxels by the map's absolute value by
default (``signed=False``): a map's sign says in which direction a voxel's intensity pushed the output,
which flips between subjects above and below the baseline (an atrophic AD brain and a control's, for the
same region) and whose convention differs between methods (LRP, IG, Grad-CAM) and input contrasts, while
the question scored here is *where* the model looks. ``signed=True`` ranks by the signed value
instead, for maps whose positive side is the evidence of interest.

- Dice of the top 1 %, 5 % and 10 % voxels of the map against the truth's top voxels of the same share,
  or, with ``binary_truth=True``, against the truth mask (truth > threshold).
- ROC AUC of the map's values as a detector of the truth mask (truth > threshold).
- Pearson correlation of the map's values with the truth's.
- For a group map, the jackknife standard error of its ROC AUC over the subjects averaged
  (`jackknife_auc_se`): how much the score depends on which subjects were explained.

The same scores of a linear SVM's weights, turned into an activation pattern (`haufe_pattern`), are the
baseline every heatmap method should beat.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score

from endopheno.errors import InputError

FRACTIONS = (0.01, 0.05, 0.10)

__all__ = ["FRACTIONS", "below_randomised", "correlation", "dice", "dice_at_top", "haufe_pattern", "jackknife_auc_se",
           "roc_auc", "score_map", "top_voxels"]


def _inside(volume, mask) -> np.ndarray:
    volume = np.asarray(volume, dtype=np.float64)
    mask = np.asarray(mask) > 0
    if volume.shape != mask.shape:
        raise InputError("map", f"shape {volume.shape} differs from the mask's {mask.shape}")
    return volume[mask]


def _values(attribution, mask, signed: bool) -> np.ndarray:
    values = _inside(attribution, mask)
    return values if signed else np.abs(values)


def _truth_mask(truth, mask, threshold: float) -> np.ndarray:
    positive = _inside(truth, mask) > threshold
    if positive.all() or not positive.any():
        raise InputError("truth map", f"needs voxels both above and at or below {threshold} inside the mask, "
                                      f"has {int(positive.sum())} of {positive.size} above")
    return positive


def top_voxels(values: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean selection of the ``max(1, round(fraction · n))`` largest of `values`; ties are broken by
    position (a stable sort), so the same values give the same selection."""
    if not 0 < fraction <= 1:
        raise InputError("fraction", f"must lie in (0, 1], got {fraction}")
    k = max(1, int(round(fraction * values.size)))
    chosen = np.zeros(values.size, dtype=bool)
    chosen[np.argsort(-values, kind="stable")[:k]] = True
    return chosen


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient 2|A ∩ B| / (|A| + |B|) of two boolean selections (Dice 1945); 0 when both are
    empty."""
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else 0.0


def dice_at_top(attribution, truth, mask, fractions=FRACTIONS, *, binary_truth: bool = False,
                threshold: float = 0.0, signed: bool = False) -> dict[float, float]:
    """Dice of the map's top voxels inside `mask`, per fraction.

    The reference is the truth's own top voxels of the same fraction (a continuous truth: the most atrophic
    voxels), or with ``binary_truth=True`` the truth mask ``truth > threshold`` whatever its size (then a
    perfect map reaches Dice 1 only at the fraction equal to the mask's share of the brain). A binary truth
    needs ``binary_truth=True``: its "top voxels" would otherwise be picked among ties by position.
    """
    values = _values(attribution, mask, signed)
    reference = _truth_mask(truth, mask, threshold) if binary_truth else None
    out = {}
    for f in fractions:
        target = reference if binary_truth else top_voxels(_inside(truth, mask), f)
        out[f] = dice(top_voxels(values, f), target)
    return out


def roc_auc(attribution, truth, mask, *, threshold: float = 0.0, signed: bool = False) -> float:
    """ROC AUC of the map's values inside `mask` as a score for the voxels of the truth mask
    (``truth > threshold``): the probability that a random truth voxel outranks a random other voxel."""
    return float(roc_auc_score(_truth_mask(truth, mask, threshold), _values(attribution, mask, signed)))


def correlation(attribution, truth, mask, *, signed: bool = False) -> float:
    """Pearson correlation of the map's values with the truth's inside `mask`."""
    return float(stats.pearsonr(_values(attribution, mask, signed), _inside(truth, mask))[0])


def score_map(attribution, truth, mask, fractions=FRACTIONS, *, binary_truth: bool = False, threshold: float = 0.0,
              signed: bool = False) -> dict[str, float]:
    """Every score of one map: ``dice_top1`` / ``dice_top5`` / ``dice_top10`` (per fraction, named by
    percent), ``auc``, ``pearson``; one row of the method × metric table."""
    scores = {f"dice_top{100 * f:g}": d for f, d in
              dice_at_top(attribution, truth, mask, fractions, binary_truth=binary_truth, threshold=threshold,
                          signed=signed).items()}
    scores["auc"] = roc_auc(attribution, truth, mask, threshold=threshold, signed=signed)
    scores["pearson"] = correlation(attribution, truth, mask, signed=signed)
    return scores


def jackknife_auc_se(maps, truth, mask, *, threshold: float = 0.0, signed: bool = False) -> float:
    """Jackknife standard error (Quenouille 1956; Efron & Stein 1981, Ann Stat 9:586) of the ROC AUC of a
    group map, the mean of `maps` (``[N, ...]``, one per subject): sqrt((N-1)/N · Σ (θ₋ᵢ − θ̄)²) over
    the N leave-one-subject-out group maps.

    It says how far another draw of N subjects would move the group map's score (on the phantom, ±0.04
    between the first 20 and all 40 subjects), not how well the model explains any one subject; the
    truth's voxels are fixed. Assumes exchangeable subjects and a statistic smooth in the map (AUC of a
    mean map is). Not the bootstrap: resampling subjects with replacement averages fewer distinct
    maps, so its AUCs fall below the estimate (on noisy simulated maps the percentile interval missed the
    estimate entirely), while the jackknife's error matched the spread over independent draws."""
    positive = _truth_mask(truth, mask, threshold)
    values = np.stack([_inside(m, mask) for m in maps])
    n = len(values)
    if n < 2:
        return math.nan
    total = values.sum(axis=0)
    aucs = np.empty(n)
    for i in range(n):
        mean = (total - values[i]) / (n - 1)
        aucs[i] = roc_auc_score(positive, mean if signed else np.abs(mean))
    return float(np.sqrt((n - 1) / n * ((aucs - aucs.mean()) ** 2).sum()))


def below_randomised(scores) -> list[str]:
    """One sentence per method of a ``scores.tsv`` table (columns ``method``, ``auc_randomised`` and
    ``auc_on_control_subjects``, or ``auc`` where a table lacks that) whose map finds the truth no better
    than the same method on the randomised network, both averaged over the same subjects: the
    model-parameter randomisation test of Adebayo et al. (2018) failed, so the map does not show what the
    model learned (on the phantom's `cnn3d`, Guided Grad-CAM, whose ReLU keeps only positive evidence of
    the AD logit while that network's evidence at the atrophy is negative: BENCHMARKS.md)."""
    if "auc_randomised" not in scores:
        return []
    model = scores["auc_on_control_subjects"] if "auc_on_control_subjects" in scores else scores["auc"]
    failed = np.isfinite(model) & np.isfinite(scores["auc_randomised"]) & (model <= scores["auc_randomised"])
    return [f"{method}: its map finds the truth no better than on the randomised network (AUC {auc:.3f} against "
            f"{control:.3f} on the same subjects), so it does not show what this model learned"
            for method, auc, control in zip(scores["method"][failed], model[failed], scores["auc_randomised"][failed])]


def haufe_pattern(weights, X) -> np.ndarray:
    """The activation pattern of a linear model's weights (Haufe et al. 2014, NeuroImage 87:96–110).

    A backward model ŷ = X w (intercept irrelevant) has weights that also cancel noise, so they do not say
    where the signal is; the corresponding forward model's pattern does: A = Σ_X W Σ_ŷ⁻¹ (their eq. 6),
    for one output a = cov(X, ŷ) / var(ŷ). Computed from the centred data as Xcᵀ(Xc W) without forming
    the voxel × voxel covariance Σ_X, so it costs O(n · p · k) for n subjects, p voxels, k outputs.

    Parameters
    ----------
    weights : ``[p]`` or ``[p, k]`` (e.g. a linear SVM's ``coef_.T``).
    X : ``[n, p]``, the data the model was fitted on (as it saw them, after any scaling).

    Returns
    -------
    ``[p]`` or ``[p, k]``, the shape of `weights`.
    """
    X = np.asarray(X, dtype=np.float64)
    W = np.asarray(weights, dtype=np.float64)
    single = W.ndim == 1
    W = W[:, None] if single else W
    if X.ndim != 2 or W.shape[0] != X.shape[1] or X.shape[0] < 2:
        raise InputError("haufe_pattern", f"needs X [n >= 2, p] and weights [p] or [p, k]; got X {X.shape}, "
                                          f"weights {np.shape(weights)}")
    Xc = X - X.mean(axis=0)
    Y = Xc @ W                                                   # centred outputs [n, k]
    cov_xy = Xc.T @ Y / (len(X) - 1)                             # [p, k] = Σ_X W
    cov_yy = Y.T @ Y / (len(X) - 1)                              # [k, k] = Σ_ŷ
    pattern = np.linalg.solve(cov_yy, cov_xy.T).T                # Σ_X W Σ_ŷ⁻¹ (Σ_ŷ symmetric)
    return pattern[:, 0] if single else pattern
