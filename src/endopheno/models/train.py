"""Cross-validated training of one model of `params.yaml` (`train.models.<name>`), tracked in MLflow and
registered as ``endopheno.<name>``.

For each outer fold (``splits.outer_folds``): normalisation is fitted on the training subjects, the
split and the normalisation are checked for leakage, the network trains with early stopping on the
validation subjects, and the test subjects are scored once, beside a baseline fitted on the same
training subjects (a linear SVM on voxels for classification, a linear SVR for regression, the same
autoencoder with its random initial weights for reconstruction). The final model is then trained on
every subject (validation split kept for early stopping), logged with its signature and registered;
the version with the best cross-validated metric holds the alias ``champion``.

On a CPU the trainings of a run (the folds and the final model) run side by side in worker processes,
each with a share of the cores (``workers``, ``threads``): a small 3D CNN gains little from a second
torch thread (cnn3d on 2 cores: 1.47x the throughput of one thread, where two trainings side by side
give 2x), and the trainings are independent. Their per-epoch metrics reach MLflow when each finishes.

A run checkpoints every epoch under ``<checkpoints>/<name>/<key>/`` (``key`` = digest of the
parameters, the volume store, the subjects' targets and the models package's code); rerunning the same
command resumes it, in the same MLflow run. A finished fold keeps only its results (``fold<k>.json``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import pickle
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from sklearn.metrics import balanced_accuracy_score, mean_absolute_error, roc_auc_score

from endopheno.errors import InputError
from endopheno.models.architectures import build, layout_of, parcel_centres_in, ward_parcels
from endopheno.models.basis import fold_into, independent_components
from endopheno.models.data import (TaskData, VolumeDataset, adjusted, augmentation, brain_mask, covariate_design, covariate_effects,
                                   filtered, fit_normalisation, midline_of, participant_table, pool_factor, task_data)
from endopheno.models.splits import Split, check_normalisation, check_split, outer_folds, pooled_strata
from endopheno.models.volume_model import VolumeModel, model_grid_affine
from endopheno.params import from_section

log = logging.getLogger(__name__)
REGISTRY_PREFIX = "endopheno."
# The cross-validated metric that decides the champion, per task, and whether higher is better.
SELECTION = {"classification": ("balanced_accuracy", True), "regression": ("mae", False),
             "reconstruction": ("masked_mse", False)}


@dataclass(frozen=True)
class ModelSpec:
    """One entry of ``train.models``: what to train and how."""

    name: str
    architecture: str
    task: str = "classification"
    target: str = "diagnosis"           # participants.tsv column (classification, regression)
    inputs: tuple[str, ...] = ("T1w",)  # input maps, one channel each: a store modality or `gm`
    options: dict = field(default_factory=dict)   # architecture options (models/architectures.py)
    epochs: int = 30
    batch_size: int = 8
    learning_rate: float = 1e-3         # the peak of the one-cycle schedule
    weight_decay: float = 1e-4
    warmup: float = 0.1                 # share of the epochs the learning rate ramps up over
    patience: int = 8                   # epochs without a better validation loss before stopping
    folds: int | None = None            # outer folds for this model (null: train.folds)
    augment: dict | None = None         # data.augmentation knobs
    mixup: float = 0.0                  # classification: Beta(a, a) mixup of batch pairs (Zhang et al. 2018); 0 = off
    restarts: int = 1                   # new initialisations for a network whose validation loss never beats chance
    top_k: int = 5                      # patch27: patches combined in the final network
    patch_epochs: int = 10              # patch27: epochs of the 27 single-patch networks
    basis: str | None = None            # reconstruction: `ica`, the final latent's axes as independent components (models/basis.py)
    bilateral: bool = False             # each input map averaged with its left-right mirror image (data.bilateral): for bilateral atrophy
    covariates: tuple[str, ...] = ()    # participants.tsv columns whose voxelwise effect, fitted in the training controls, is removed (data.covariate_effects)
    highpass_mm: float | None = None    # input maps minus their Gaussian-smoothed copy (SD in mm; data.highpass); null = as read
    normalisation: str = "map"          # map: one mean and SD per input map | voxel: each voxel's own (training subjects)
    parcels: str = "bumps"              # parcels bottleneck's start: bumps (around k-means centres of the mask) | ward (of the training maps)


@dataclass(frozen=True)
class TrainParams:
    """The ``train`` section of params.yaml (``models`` holds the ModelSpec entries)."""

    store: str = "stores/volumes.zarr"
    participants: str = "data/phantom/bids/participants.tsv"
    checkpoints: str = "stores/models"
    tracking_uri: str | None = None
    device: str = "auto"                # auto = CUDA when present
    amp: str = "auto"                   # mixed precision: auto = on CUDA only (bfloat16 on CPUs is slower here)
    deterministic: bool = True
    seed: int = 1
    folds: int = 5
    validation_fraction: float = 0.2
    resolution_mm: float | None = 4.0   # the models' grid; null = the store's
    in_memory: bool = True              # train from the pooled maps the trainer reads once anyway; false: stream from Zarr
    loader_workers: int = 1             # DataLoader worker processes (prefetching reads and augmentation) when streaming
    threads: int | None = None          # torch threads of each training (null: the cores shared among the workers)
    workers: int | None = None          # CPU: trainings (folds, final model) side by side (null: one per core, at most one
                                        # per training; 1: one after another). On CUDA they always run one after another
    classes: tuple[str, str] = ("CN", "AD")   # classification: negative, positive
    svm_c: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)   # baseline SVM: C chosen on the validation split
    final_model: bool = True            # train and register a model on all subjects after the folds
    models: dict = field(default_factory=dict)
    pipeline: tuple[str, ...] = ()      # the models `dvc repro` trains (one stage each)


def load_train_params(section: dict) -> TrainParams:
    p = from_section(TrainParams, section, "train")
    return TrainParams(**{**asdict(p), "classes": tuple(p.classes), "svm_c": tuple(p.svm_c), "pipeline": tuple(p.pipeline)})


def model_spec(p: TrainParams, name: str) -> ModelSpec:
    if name not in p.models:
        raise InputError(name, f"no such model in params.yaml train.models (known: {', '.join(p.models) or 'none'})")
    spec = from_section(ModelSpec, {"name": name, **p.models[name]}, f"train.models.{name}")
    if spec.task not in SELECTION:
        raise InputError(f"train.models.{name}", f"task {spec.task!r} is not one of {', '.join(SELECTION)}")
    if not spec.mixup >= 0:
        raise InputError(f"train.models.{name}", f"mixup must be a Beta parameter > 0, or 0 for none; got {spec.mixup!r}")
    if spec.normalisation not in ("map", "voxel"):
        raise InputError(f"train.models.{name}", f"normalisation {spec.normalisation!r}: map or voxel")
    if spec.highpass_mm is not None and not spec.highpass_mm > 0:
        raise InputError(f"train.models.{name}", f"highpass_mm {spec.highpass_mm!r}: a Gaussian SD in mm > 0, or null")
    if spec.basis not in (None, "ica") or (spec.basis and spec.task != "reconstruction"):
        raise InputError(f"train.models.{name}", f"basis {spec.basis!r}: only `ica`, of a reconstruction model's latent")
    if spec.basis and spec.options.get("bottleneck") == "parcels":
        raise InputError(f"train.models.{name}", "basis ica would mix the dimensions of the parcels bottleneck, each tied to its parcel")
    if spec.parcels not in ("bumps", "ward"):
        raise InputError(f"train.models.{name}", f"parcels {spec.parcels!r}: bumps or ward")
    if spec.target in spec.covariates and spec.task != "reconstruction":
        raise InputError(f"train.models.{name}.covariates", f"holds the model's target {spec.target!r}")
    folds = spec.folds if spec.folds is not None else p.folds
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise InputError(f"train.models.{name}", f"folds {folds!r}: cross-validation needs at least 2 (the model on "
                                                 "every subject is train.final_model)")
    return ModelSpec(**{**asdict(spec), "inputs": tuple(spec.inputs), "covariates": tuple(spec.covariates)})


def to_device(x: torch.Tensor, device: torch.device, layout: torch.memory_format) -> torch.Tensor:
    """A batch of volumes [B, C, X, Y, Z] on `device`, in `layout`."""
    return x.to(device, non_blocking=True, memory_format=layout)


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda", "no CUDA device is available (use device: auto or cpu)")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------- training


def task_loss(task: str, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if task == "classification":
        # [B, classes] or, for the 27 single-patch networks trained side by side, [B, patches, classes]
        return F.cross_entropy(out.transpose(1, -1) if out.dim() == 3 else out, y.long()[:, None].expand(-1, out.shape[1])
                               if out.dim() == 3 else y.long())
    if task == "regression":
        return F.mse_loss(out[:, 0].float(), y)
    # reconstruction: mean squared error over brain voxels only (the background is all zeros)
    m = mask.to(out.dtype)
    return (((out - x) ** 2) * m).sum() / (m.sum() * x.shape[0] * x.shape[1])


@dataclass
class FitResult:
    best_epoch: int
    best_loss: float
    epochs: int
    samples: int
    seconds: float
    history: list = field(default_factory=list)

    @property
    def volumes_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else float("nan")


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def fit(net: torch.nn.Module, train: torch.utils.data.DataLoader, validation: torch.utils.data.DataLoader, *,
        task: str, spec: ModelSpec, epochs: int, device: torch.device, amp: bool, mask: torch.Tensor,
        checkpoint: Path | None = None, label: str = "", on_epoch=None) -> FitResult:
    """AdamW with a one-cycle learning rate (warm-up to `spec.learning_rate`, cosine decay to ~0 at
    `epochs`; Smith & Topin 2019, arXiv:1708.07120) and early stopping on the validation loss; `net` ends
    holding its best epoch's weights. The warm-up keeps the first large steps from collapsing a small
    3D CNN onto one class, as a constant 1e-3 did on one fold of five on the phantom. With
    `checkpoint`, the state is saved after every epoch and a rerun resumes from it."""
    layout = layout_of(net)
    net.to(device, memory_format=layout)
    mask = mask.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay)
    total_steps = max(epochs * len(train), 4)
    # OneCycleLR needs at least two steps in each phase (a very short run gets a longer warm-up share)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.learning_rate, total_steps=total_steps,
                                                   pct_start=min(max(spec.warmup, 2 / total_steps), 0.5), anneal_strategy="cos")
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    state = {"epoch": 0, "best_loss": math.inf, "best_epoch": 0, "best": copy.deepcopy(net.state_dict()),
             "bad": 0, "history": [], "samples": 0, "seconds": 0.0}
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        net.load_state_dict(state["net"]), opt.load_state_dict(state["opt"])
        # The schedule is replayed, not restored: a rerun asked for more epochs continues on its own
        # (longer) schedule from the step reached.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "scheduler.step() before optimizer.step()"
            for _ in range(min(state["epoch"] * len(train), total_steps - 1)):
                schedule.step()
        torch.set_rng_state(state["rng"])
        for generator, saved in zip(_generators(train), state.get("generators", [])):
            generator.set_state(saved)
        log.info("%s: resumed after epoch %d", label, state["epoch"])
    autocast = dict(device_type=device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16, enabled=amp)
    columns = [TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("epoch {task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.4f} val {task.fields[val]:.4f} {task.fields[rate]:.1f} vol/s"),
               TimeElapsedColumn()]
    with Progress(*columns, transient=True, disable=not log.isEnabledFor(logging.INFO)) as bar:
        job = bar.add_task(label, total=epochs, completed=state["epoch"], loss=math.nan, val=math.nan, rate=math.nan)
        while state["epoch"] < epochs and state["bad"] < spec.patience:
            net.train()
            t0, total, n = time.perf_counter(), 0.0, 0
            for x, y in train:
                x, y = to_device(x, device, layout), y.to(device, non_blocking=True)
                opt.zero_grad(set_to_none=True)
                with torch.autocast(**autocast):
                    if spec.mixup > 0 and task == "classification":
                        x, y2, share = _mixup(x, y, spec.mixup)
                        out = net(x)
                        loss = share * task_loss(task, out, x, y, mask) + (1 - share) * task_loss(task, out, x, y2, mask)
                    else:
                        loss = task_loss(task, net(x), x, y, mask)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                schedule.step()
                total, n = total + float(loss.detach()) * len(x), n + len(x)
            seconds = time.perf_counter() - t0
            val = evaluate_loss(net, validation, task=task, device=device, amp=amp, mask=mask, layout=layout)
            state["epoch"] += 1
            state["samples"] += n
            state["seconds"] += seconds
            record = {"epoch": state["epoch"], "train_loss": total / max(n, 1), "val_loss": val, "volumes_per_s": n / seconds,
                      "learning_rate": schedule.get_last_lr()[0]}
            state["history"].append(record)
            if val < state["best_loss"] - 1e-6:
                state.update(best_loss=val, best_epoch=state["epoch"], best=copy.deepcopy(net.state_dict()), bad=0)
            else:
                state["bad"] += 1
            if checkpoint is not None:
                _save_atomic({**state, "net": net.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state(),
                              "generators": [g.get_state() for g in _generators(train)]}, checkpoint)
            if on_epoch:
                on_epoch(record)
            bar.update(job, completed=state["epoch"], loss=record["train_loss"], val=val, rate=record["volumes_per_s"])
    net.load_state_dict(state["best"])
    net.to(memory_format=torch.contiguous_format)  # the registered model holds ordinary tensors
    return FitResult(state["best_epoch"], state["best_loss"], state["epoch"], state["samples"], state["seconds"], state["history"])


def _generators(loader: torch.utils.data.DataLoader) -> list[torch.Generator]:
    """The generators that decide an epoch's order (the sampler's) and its worker seeds (the loader's):
    restored with a checkpoint, so that a resumed training sees the epochs an uninterrupted one would.
    (Augmentations drawn in persistent worker processes are not restored: the resumed epochs draw anew.)"""
    found = [loader.generator, getattr(loader.sampler, "generator", None)]
    return list({id(g): g for g in found if g is not None}.values())


def _mixup(x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup (Zhang, Cisse, Dauphin & Lopez-Paz 2018, ICLR): the batch blended with a shuffled copy of itself,
    x' = λ·x + (1 − λ)·x[perm], λ ~ Beta(α, α), trained against both labels weighted λ and 1 − λ. On a
    log-Jacobian map a blend of two subjects is a plausible subject (local volumes mix linearly). Draws
    come from torch's generator, which `fit`'s caller seeds."""
    share = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(x)).to(x.device)
    return share * x + (1 - share) * x[perm], y[perm], share


@torch.no_grad()
def evaluate_loss(net, loader, *, task, device, amp, mask, layout) -> float:
    net.eval()
    total, n = 0.0, 0
    autocast = dict(device_type=device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16, enabled=amp)
    for x, y in loader:
        x, y = to_device(x, device, layout), y.to(device)
        with torch.autocast(**autocast):
            total += float(task_loss(task, net(x), x, y, mask.to(device))) * len(x)
        n += len(x)
    return total / max(n, 1)


@torch.no_grad()
def outputs(net, loader, *, task: str, device: torch.device, mask: torch.Tensor) -> np.ndarray:
    """Per subject: P(positive class) (per patch for [B, patches, 2] outputs), the standardised prediction,
    or (masked MSE, correlation of input and reconstruction inside the mask)."""
    net.eval().to(device)
    mask = mask.to(device)
    rows = []
    for x, _ in loader:
        x = x.to(device)
        out = net(x).float()
        if task == "classification":
            rows.append(torch.softmax(out, dim=-1)[..., -1].cpu().numpy())
        elif task == "regression":
            rows.append(out[:, 0].cpu().numpy())
        else:
            a, b = x[:, :, mask], out[:, :, mask]
            mse = ((a - b) ** 2).mean(dim=(1, 2))
            a, b = a.flatten(1) - a.flatten(1).mean(1, keepdim=True), b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
            r = (a * b).sum(1) / torch.sqrt((a * a).sum(1) * (b * b).sum(1))
            rows.append(torch.stack([mse, r], 1).cpu().numpy())
    return np.concatenate(rows)


def scores(task: str, predicted: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Test metrics: balanced accuracy and ROC AUC; MAE and r (target units); masked MSE and r."""
    if task == "classification":
        return {"balanced_accuracy": float(balanced_accuracy_score(target, predicted >= 0.5)),
                "auc": float(roc_auc_score(target, predicted)) if len(set(target)) == 2 else math.nan}
    if task == "regression":
        return {"mae": float(mean_absolute_error(target, predicted)), "r": float(np.corrcoef(target, predicted)[0, 1])}
    return {"masked_mse": float(predicted[:, 0].mean()), "correlation": float(predicted[:, 1].mean())}


# ---------------------------------------------------------------------------------------------- baselines


def linear_baseline(task: str, voxels: np.ndarray, target: np.ndarray, split: Split, c_grid) -> dict[str, float]:
    """A linear SVM (classification) or SVR (regression) on brain voxels, standardised with the training
    subjects' voxel means and SDs, C chosen on the validation subjects, refitted on training +
    validation, scored on the test subjects (the classic baseline of CNN studies of AD, e.g. Wen et al.
    2020). Assumes the classes (or the target) are linearly related to voxel intensities."""
    from sklearn.svm import LinearSVC, LinearSVR

    if task == "classification" and len(set(target[split.train])) < 2:
        log.warning("fold %d: the training subjects hold one class only; no SVM baseline", split.fold)
        return {"balanced_accuracy": math.nan, "auc": math.nan}
    mean, sd = voxels[split.train].mean(0), voxels[split.train].std(0) + 1e-6
    z = (voxels - mean) / sd
    units = target
    if task == "regression":
        # liblinear penalises the intercept too: on a raw target (ages ~70) a strong penalty pulls every
        # prediction toward 0, so the SVR fits the training subjects' standardised target
        t_mean, t_sd = float(target[split.train].mean()), float(target[split.train].std() + 1e-9)
        target = (target - t_mean) / t_sd
    make = (lambda c: LinearSVC(C=c, max_iter=20000)) if task == "classification" else (lambda c: LinearSVR(C=c, max_iter=20000))

    def score(model, rows):
        s = model.decision_function(z[rows]) if task == "classification" else model.predict(z[rows])
        if task == "classification":
            return scores(task, 1 / (1 + np.exp(-s)), target[rows])["balanced_accuracy"]
        return -mean_absolute_error(target[rows], s)

    best = max(c_grid, key=lambda c: score(make(c).fit(z[split.train], target[split.train]), split.validation))
    fit_rows = np.concatenate([split.train, split.validation])
    model = make(best).fit(z[fit_rows], target[fit_rows])
    if task == "classification":
        return scores(task, 1 / (1 + np.exp(-model.decision_function(z[split.test]))), target[split.test])
    return scores(task, model.predict(z[split.test]) * t_sd + t_mean, units[split.test])


# ------------------------------------------------------------------------------------------------ the run


@dataclass
class TrainReport:
    name: str
    task: str
    folds: list[dict]
    baseline: list[dict]
    summary: dict
    run_id: str
    version: str | None = None
    champion: bool = False
    excluded: list = field(default_factory=list)

    def line(self) -> str:
        metric, _ = SELECTION[self.task]
        base = "untrained" if self.task == "reconstruction" else "linear SVM" if self.task == "classification" else "linear SVR"
        text = (f"{REGISTRY_PREFIX}{self.name}: {metric} {self.summary[f'{metric}_mean']:.3f} ± {self.summary[f'{metric}_sd']:.3f} "
                f"over {len(self.folds)} folds ({base} baseline {self.summary[f'baseline_{metric}_mean']:.3f})")
        if self.version:
            text += f"; registered version {self.version}" + (" (champion)" if self.champion else "")
        return text + f"; MLflow run {self.run_id}"


class Trainer:
    """Everything one model's run shares across folds: data, grid, device, loaders, logging."""

    def __init__(self, p: TrainParams, spec: ModelSpec):
        from endopheno.volumes.preprocess import open_mni, volume_store_digest

        self.p, self.spec = (replace(p, folds=spec.folds) if spec.folds else p), spec
        self.device = device_of(p.device)
        self.amp = (p.amp == "auto" and self.device.type == "cuda") or p.amp is True or p.amp == "on"
        if p.threads:
            torch.set_num_threads(p.threads)
        if p.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        ds = open_mni(p.store)
        self.digest = volume_store_digest(ds)
        self.data: TaskData = task_data(ds, p.participants, spec.task, target=spec.target, classes=p.classes,
                                        covariates=spec.covariates)
        if spec.task == "reconstruction":
            self.data = replace(self.data, strata=pooled_strata(self.data.strata, self.p.folds))
        self.design, self.levels = covariate_design(participant_table(p.participants).loc[self.data.groups], spec.covariates) \
            if spec.covariates else (np.zeros((len(self.data), 0)), {})
        store_mm = float(abs(np.asarray(ds.attrs["affine"])[0, 0]))
        self.factor = pool_factor(store_mm, p.resolution_mm)
        self.affine = model_grid_affine(np.asarray(ds.attrs["affine"]), self.factor)
        self.mask = brain_mask(ds, self.factor)
        self.parcel_centres: dict[int, list[list[float]]] = {}  # latent size -> start of the parcels bottleneck
        self.highpass_voxels = spec.highpass_mm / (store_mm * self.factor) if spec.highpass_mm else None
        self.midline = midline_of(self.affine) if spec.bilateral else None
        reader = VolumeDataset(p.store, self.data.rows, self.data.target, inputs=spec.inputs, factor=self.factor, mask=self.mask,
                               highpass_voxels=self.highpass_voxels, midline=self.midline)
        # Every subject's pooled maps, once: normalisation statistics, the voxel baselines and (with
        # `in_memory`) the training loaders read them from memory.
        self.volumes = torch.stack([reader.volume(i) for i in range(len(reader))])
        # The covariates' effects are fitted on the unfiltered maps, so that the registered model, which
        # filters what it is given, can remove them before it does (the filters are linear).
        self.unfiltered = self.volumes
        if spec.covariates and (self.highpass_voxels or self.midline is not None):
            raw = VolumeDataset(p.store, self.data.rows, self.data.target, inputs=spec.inputs, factor=self.factor, mask=self.mask)
            self.unfiltered = torch.stack([raw.volume(i) for i in range(len(raw))])
        self.shape = tuple(self.volumes.shape[2:])
        # Whatever decides a fold's result: a rerun with all of it unchanged resumes; a change to any (the
        # participants' table included: a corrected diagnosis changes targets and folds) starts afresh.
        key = {"spec": asdict(spec), "params": {k: v for k, v in asdict(self.p).items() if k not in ("models", "pipeline")},
               "digest": self.digest, "data": self.data.digest(), "code": code_digest()}
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
        self.checkpoints = Path(p.checkpoints) / spec.name / self.key

    # data -------------------------------------------------------------------------------------------

    def target_scale(self, rows: np.ndarray) -> tuple[float, float]:
        if self.spec.task != "regression":
            return 0.0, 1.0
        t = self.data.target[rows]
        return float(t.mean()), float(t.std() + 1e-9)

    def adjustment(self, split: Split) -> torch.Tensor | None:
        """The covariates' voxelwise effects (`covariates`), fitted on the training subjects of `split`
        alone, the controls among them for a classifier (data.covariate_effects); None without covariates."""
        if not self.spec.covariates:
            return None
        train = split.train
        reference = train[self.data.target[train] == 0] if self.spec.task == "classification" else train
        return covariate_effects(self.unfiltered, self.design, reference)

    def maps(self, rows: np.ndarray, effects: torch.Tensor | None) -> torch.Tensor:
        """The pooled, filtered maps of `rows` with the covariate `effects` removed: what the network reads
        (the filtered maps minus the filtered effects, which is the filtered adjusted maps)."""
        if effects is not None:
            effects = filtered(effects, self.mask, self.highpass_voxels, self.midline)
        return adjusted(self.volumes[rows], self.design[rows], effects)

    def normalisation(self, rows: np.ndarray, effects: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return fit_normalisation(self.maps(rows, effects), self.mask, self.spec.normalisation)

    def loader(self, rows: np.ndarray, norm, scale, *, shuffle: bool, seed: int,
               effects: torch.Tensor | None = None) -> torch.utils.data.DataLoader:
        target = (self.data.target[rows] - scale[0]) / scale[1]
        augment = augmentation(self.spec.augment, seed) if shuffle else None
        dataset = VolumeDataset(self.p.store, self.data.rows[rows], target, inputs=self.spec.inputs, factor=self.factor,
                                mask=self.mask, normalise=norm, augment=augment, highpass_voxels=self.highpass_voxels,
                                midline=self.midline, adjust=(self.design[rows], effects),
                                volumes=self.maps(rows, effects) if self.p.in_memory else None)
        # From memory an item costs a subtraction and a division: a worker process would only take CPU
        # from the network (on 2 cores cnn3d's folds train 1.8x faster without; BENCHMARKS.md).
        workers = 0 if self.p.in_memory else self.p.loader_workers
        # The order has a generator of its own: the loader's also seeds workers, once (persistent) or
        # every epoch (none), and sharing it would make the order depend on `in_memory`.
        order = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)) if shuffle else None
        return torch.utils.data.DataLoader(
            dataset, batch_size=self.spec.batch_size, sampler=order, num_workers=workers,
            persistent_workers=workers > 0, prefetch_factor=2 if workers else None, worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(seed), pin_memory=self.device.type == "cuda")

    def net(self, seed: int, **overrides) -> torch.nn.Module:
        torch.manual_seed(seed)
        n_outputs = {"classification": 2, "regression": 1, "reconstruction": None}[self.spec.task]
        options = {**self.spec.options, **overrides}
        if options.get("bottleneck") == "parcels" and options.get("parcel_centres") is None:
            # the parcels start spread over the brain, not over the grid's empty corners; the same centres
            # for every fold, the untrained copy and the final model, so k-means runs once
            latent = options.get("latent", 128)
            if latent not in self.parcel_centres:
                self.parcel_centres[latent] = parcel_centres_in(self.mask, latent, seed=self.p.seed)
            options["parcel_centres"] = self.parcel_centres[latent]
        return build(self.spec.architecture, self.shape, len(self.spec.inputs), n_outputs, **options)

    # one fold -----------------------------------------------------------------------------------------

    def train_split(self, split: Split, seed: int, checkpoint: Path | None, label: str):
        """Train on `split` (train + validation). Returns (net, normalisation, target scale, FitResult, info)."""
        check_split(split, self.data.groups)
        effects = self.adjustment(split)
        norm = self.normalisation(split.train, effects)
        scale = self.target_scale(split.train)
        train = self.loader(split.train, norm, scale, shuffle=True, seed=seed, effects=effects)
        validation = self.loader(split.validation, norm, scale, shuffle=False, seed=seed, effects=effects)
        # What the loaders apply, against the statistics of the training subjects alone, fitted afresh here
        # (not through `normalisation`, whatever it may become).
        training = fit_normalisation(self.maps(split.train, effects), self.mask, self.spec.normalisation)
        for loader in (train, validation):
            check_normalisation(split, loader.dataset.normalise, training)
        if effects is not None:  # and the covariate effects, against those of the training controls alone
            controls = split.train[self.data.target[split.train] == 0] if self.spec.task == "classification" else split.train
            check_normalisation(split, (effects,), (covariate_effects(self.unfiltered, self.design, controls),))
        for attempt in range(self.spec.restarts + 1):
            info = {}
            if self.spec.architecture == "patch27":
                net, info = self.select_patches(train, validation, split, seed, checkpoint, label)
            else:
                net = self.net(seed)
                if self.spec.parcels == "ward" and self.spec.options.get("bottleneck") == "parcels":
                    self.start_parcels(net, self.maps(split.train, effects), norm)
            result = fit(net, train, validation, task=self.spec.task, spec=self.spec, epochs=self.spec.epochs, device=self.device,
                         amp=self.amp, mask=self.mask, checkpoint=checkpoint, label=label)
            chance = self.chance_loss(split.train)
            if result.best_loss < 0.98 * chance or attempt >= self.spec.restarts:
                break
            # A network stuck at the loss of the class prior has collapsed (dead units, one class): a new
            # initialisation, on the training subjects only, is a fair retry; the test fold is untouched.
            log.warning("%s: validation loss %.3f never beat chance (%.3f): the network collapsed; retrying with a new "
                        "initialisation (%d of %d)", label, result.best_loss, chance, attempt + 1, self.spec.restarts)
            seed += 7919
            if checkpoint is not None:
                checkpoint.unlink(missing_ok=True)
        return net, norm, scale, result, {**info, "restarts": attempt}

    def chance_loss(self, rows: np.ndarray) -> float:
        """The validation loss of a model that ignores the image: the class prior's cross-entropy, the
        target's variance (1 once standardised); inf for reconstruction (no collapse check)."""
        if self.spec.task == "classification":
            q = float(np.clip(self.data.target[rows].mean(), 1e-6, 1 - 1e-6))
            return -(q * math.log(q) + (1 - q) * math.log(1 - q))
        return 1.0 if self.spec.task == "regression" else math.inf

    def start_parcels(self, net, volumes: torch.Tensor, norm) -> None:
        """Start the parcels bottleneck as a Ward parcellation of what the network reads (the normalised,
        filtered maps) of the training subjects alone (`volumes`). The untrained baseline keeps the bumps:
        the parcellation is fitted to data, a part of training."""
        maps = ((volumes - norm[0]) / norm[1] * self.mask).flatten(0, 1)   # each map of each subject a sample
        net.encoder[-1].start_as(ward_parcels(maps, self.mask, net.embedding_dim))

    def select_patches(self, train, validation, split: Split, seed: int, checkpoint, label):
        """patch27: the 27 single-patch networks train side by side (one pass over the data per epoch),
        are ranked by ROC AUC on the validation subjects, and the top k become the branches of the final
        network. The test subjects are never seen here."""
        from endopheno.models.architectures import PatchNet

        singles = torch.nn.ModuleList(self.net(seed + i, patches=(i,)) for i in range(27))
        side_by_side = _SideBySide(singles)
        fit(side_by_side, train, validation, task=self.spec.task, spec=self.spec, epochs=self.spec.patch_epochs,
            device=self.device, amp=self.amp, mask=self.mask,
            checkpoint=checkpoint.with_name(checkpoint.stem + "_patches.pt") if checkpoint else None,
            label=f"{label} patches")
        probability = outputs(side_by_side, validation, task="classification", device=self.device, mask=self.mask)
        target = self.data.target[split.validation]
        auc = [roc_auc_score(target, probability[:, i]) if len(set(target)) == 2 else 0.5 for i in range(27)]
        top = [int(i) for i in np.argsort(auc)[::-1][: self.spec.top_k]]
        log.info("%s: patches %s chosen on validation AUC %s", label, top, [round(auc[i], 3) for i in top])
        net = PatchNet.from_branches([singles[i].cpu() for i in top], 2)
        return net, {"patches": top, "patch_validation_auc": [float(auc[i]) for i in top]}

    # the whole run ------------------------------------------------------------------------------------

    def run(self) -> TrainReport:
        import mlflow

        from endopheno.tracking import mlflow_run

        p, spec, data = self.p, self.spec, self.data
        if spec.basis and p.final_model and len(data) <= (latent := self.net(p.seed).embedding_dim):
            raise InputError(f"train.models.{spec.name}.basis", f"independent components of the {latent}-dim latent need "
                             f"more subjects than that ({len(data)}); set it to null for so small a cohort")
        splits = outer_folds(data.groups, data.strata, folds=p.folds, validation_fraction=p.validation_fraction, seed=p.seed)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        run_file = self.checkpoints / "mlflow_run_id"
        tags = {"endopheno.kind": "train", "model": spec.name, "architecture": spec.architecture, "task": spec.task,
                "volume_store_digest": self.digest, "checkpoint_key": self.key}
        with mlflow_run("endopheno.train", f"train {spec.name}", uri=p.tracking_uri, tags=tags,
                        run_id=run_file.read_text().strip() if run_file.exists() else None) as run:
            run_file.write_text(run.info.run_id)
            self.log_inputs(splits)
            saved = {s.fold: self.fold_saved(s) for s in splits}
            # the final model first: the longest training, so that the folds fill the other workers meanwhile
            jobs = ([("final", self.final_split())] if p.final_model else []) + [("fold", s) for s in splits if saved[s.fold] is None]
            final = None
            for (kind, split), result in self.trainings(jobs):
                if kind == "final":
                    final = split, result
                else:
                    saved[split.fold] = self.record_fold(split, result)
            folds, baseline = [saved[s.fold][0] for s in splits], [saved[s.fold][1] for s in splits]
            for split, metrics, base in zip(splits, folds, baseline):
                mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=split.fold)
                mlflow.log_metrics({f"baseline_{k}": v for k, v in base.items()}, step=split.fold)
            summary = summarise(folds, baseline)
            summary["loader_volumes_per_s"] = self.loader_throughput(splits[0])
            mlflow.log_metrics(summary)
            mlflow.log_dict({"folds": folds, "baseline": baseline, "excluded": data.excluded}, "cv_results.json")
            report = TrainReport(spec.name, spec.task, folds, baseline, summary, run.info.run_id, excluded=data.excluded)
            if final is not None:
                self.register_final(report, *final)
        return report

    # the trainings of a run -----------------------------------------------------------------------------

    def trainings(self, jobs: list[tuple[str, Split]]):
        """Yield ``((kind, split), result)`` of every job (``fold_result`` or ``final_result``) as it
        finishes: side by side in `workers` processes on a CPU (module docstring), else one after another
        in this process. A failed training stops the run."""
        from endopheno.parallel import default_workers, map_items

        cores = default_workers()
        workers = 1 if self.device.type != "cpu" else min(self.p.workers or cores, len(jobs)) or 1
        threads = self.p.threads or max(1, cores // workers)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        if self.spec.options.get("bottleneck") == "parcels":
            self.net(self.p.seed)  # the parcels' k-means start, once, before the trainer is copied to the workers
        label = f"{self.spec.name}: {len(jobs)} training(s), {workers} side by side, {threads} thread(s) each"
        for job, result in map_items(_training, jobs, workers=workers, label=label, shared={"trainer": self, "threads": threads}):
            if isinstance(result, Exception):
                raise result
            yield job, pickle.loads(result)

    def fold_saved(self, split: Split) -> tuple[dict, dict] | None:
        """(metrics, baseline) of a fold finished by an earlier run of the same key, or None."""
        done = self.checkpoints / f"fold{split.fold}.json"
        if not done.exists():
            return None
        log.info("%s fold %d: done in an earlier run, skipped", self.spec.name, split.fold)
        saved = json.loads(done.read_text())
        return saved["metrics"], saved["baseline"]

    def fold_result(self, split: Split) -> dict:
        """Train on one outer fold and score its test subjects, beside the baseline fitted on the same
        training subjects: {metrics, baseline, history}."""
        seed = self.p.seed * 1000 + split.fold
        net, norm, scale, result, info = self.train_split(split, seed, self.checkpoints / f"fold{split.fold}.pt",
                                                            f"{self.spec.name} fold {split.fold}")
        effects = self.adjustment(split)
        test = self.loader(split.test, norm, scale, shuffle=False, seed=seed, effects=effects)
        truth = self.data.target[split.test]
        metrics = {**self.test_scores(net, test, scale, truth), "best_epoch": float(result.best_epoch),
                   "train_volumes_per_s": result.volumes_per_s, **info, "test_subjects": self.data.subjects[split.test].tolist()}
        if self.spec.task == "reconstruction":
            untrained = self.net(seed)
            base = scores(self.spec.task, outputs(untrained, test, task="reconstruction", device=self.device, mask=self.mask), truth)
        else:
            voxels = self.maps(np.arange(len(self.data)), effects)[:, 0][:, self.mask].numpy()
            base = linear_baseline(self.spec.task, voxels, self.data.target, split, self.p.svm_c)
        return {"metrics": metrics, "baseline": base, "history": result.history}

    def record_fold(self, split: Split, result: dict) -> tuple[dict, dict]:
        """Log a finished fold (its epochs to MLflow, its line) and write its results: it is never retrained."""
        import mlflow

        metrics, base = result["metrics"], result["baseline"]
        for record in result["history"]:
            mlflow.log_metrics({f"fold{split.fold}_{k}": v for k, v in record.items() if k != "epoch"}, step=record["epoch"])
        log.info("%s fold %d: %s (baseline %s)", self.spec.name, split.fold,
                 ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)),
                 ", ".join(f"{k} {v:.3f}" for k, v in base.items()))
        (self.checkpoints / f"fold{split.fold}.json").write_text(json.dumps({"metrics": metrics, "baseline": base}))
        # Once its results are written a fold is never resumed: its weights would only fill the disk.
        for state in self.checkpoints.glob(f"fold{split.fold}*.pt"):
            state.unlink()
        return metrics, base

    def test_scores(self, net, test, scale, truth: np.ndarray) -> dict[str, float]:
        """The test metrics of `net` on the subjects of loader `test` (regression back in target units)."""
        predicted = outputs(net, test, task=self.spec.task, device=self.device, mask=self.mask)
        if self.spec.task == "regression":
            predicted = predicted * scale[1] + scale[0]
        return scores(self.spec.task, predicted, truth)

    def loader_throughput(self, split: Split) -> float:
        """Volumes/s of the training DataLoader alone (from memory, or with `in_memory` false the Zarr reads
        and pooling; normalisation, augmentation), to compare with the training throughput: the loader is
        not the bottleneck when it is higher."""
        effects = self.adjustment(split)
        loader = self.loader(split.train, self.normalisation(split.train, effects), self.target_scale(split.train),
                             shuffle=True, seed=0, effects=effects)
        t0, n = time.perf_counter(), 0
        for x, _ in loader:
            n += len(x)
        return n / (time.perf_counter() - t0)

    def final_split(self) -> Split:
        return outer_folds(self.data.groups, self.data.strata, folds=1, validation_fraction=self.p.validation_fraction,
                           seed=self.p.seed)[0]

    def final_result(self, split: Split) -> tuple:
        """Train on every subject of `split` (train + validation): (net, normalisation, target scale,
        FitResult, info, the untrained network of the same seed)."""
        seed = self.p.seed * 1000 + 999
        net, norm, scale, result, info = self.train_split(split, seed, self.checkpoints / "final.pt",
                                                            f"{self.spec.name} final")
        return net, norm, scale, result, info, self.net(seed)

    def final(self, report: TrainReport) -> None:
        """Train the final model in this process and register it (`register_final`)."""
        split = self.final_split()
        self.register_final(report, split, self.final_result(split))

    def register_final(self, report: TrainReport, split: Split, final: tuple) -> None:
        """Log the final model's epochs and its model with its signature, register it and decide the alias."""
        import mlflow

        net, norm, scale, result, info, untrained = final
        for record in result.history:
            mlflow.log_metrics({f"final_{k}": v for k, v in record.items() if k != "epoch"}, step=record["epoch"])
        mlflow.log_params({"final_best_epoch": result.best_epoch, **{f"final_{k}": v for k, v in info.items()}})
        if self.spec.basis:
            # The baseline gets the same treatment, so that comparing the two measures what training adds.
            self.independent_basis((net, untrained), split, norm, self.adjustment(split))
        effects = self.adjustment(split)
        model = self.volume_model(net, norm, scale, effects)
        report.version = register(model, f"{REGISTRY_PREFIX}{self.spec.name}", report, self.spec, self.p)
        metric, higher = SELECTION[self.spec.task]
        report.champion = set_champion(f"{REGISTRY_PREFIX}{self.spec.name}", report.version, metric, higher)
        if self.spec.task == "reconstruction":
            # The untrained baseline, registered beside it: its features must be beaten to be worth anything.
            # Its champion follows the trained one's, so that the two champions are always one training run's pair.
            untrained = self.volume_model(untrained, norm, scale, effects)
            twin = f"{REGISTRY_PREFIX}{self.spec.name}_untrained"
            version = register(untrained, twin, report, self.spec, self.p, untrained=True)
            mlflow.MlflowClient().set_model_version_tag(twin, version, "trained_version", report.version)
            if report.champion:
                set_champion(twin, version, None, True)

    def independent_basis(self, nets, split: Split, norm, effects: torch.Tensor | None) -> None:
        """Give the latent of each of `nets` independent-component axes, fitted on the final model's
        subjects, whose volumes are read once for all (models/basis.py)."""
        rows = np.sort(np.r_[split.train, split.validation])
        codes, inputs = [[] for _ in nets], []
        for net in nets:
            net.to(self.device).eval()
        with torch.no_grad():
            for x, _ in self.loader(rows, norm, (0.0, 1.0), shuffle=False, seed=0, effects=effects):
                x = x.to(self.device)
                for net, code in zip(nets, codes):
                    code.append(net.encode(x).double().cpu().numpy())
                inputs.append(x[:, :, self.mask.to(self.device)].flatten(1).double().cpu().numpy())
        inputs = np.concatenate(inputs)
        for net, code in zip(nets, codes):
            fold_into(net.cpu(), *independent_components(np.concatenate(code), inputs, seed=self.p.seed))

    def volume_model(self, net, norm, scale, effects: torch.Tensor | None = None) -> VolumeModel:
        return VolumeModel(net.cpu().eval(), architecture=self.spec.architecture, task=self.spec.task,
                           inputs=self.spec.inputs, factor=self.factor, affine=self.affine, mean=norm[0], sd=norm[1],
                           mask=self.mask, target_mean=scale[0], target_sd=scale[1],
                           classes=self.p.classes if self.spec.task == "classification" else (),
                           highpass_voxels=self.highpass_voxels, midline=self.midline,
                           covariates=self.levels, covariate_effects=effects)

    def log_inputs(self, splits: list[Split]) -> None:
        """Params, and the dataset read: the subjects with their target and test fold, whose digest is the
        volume store's content digest."""
        import mlflow
        import pandas as pd

        fold = np.full(len(self.data), -1)
        for s in splits:
            fold[s.test] = s.fold
        table = pd.DataFrame({"subject": self.data.subjects, "target": self.data.target, "test_fold": fold})
        with warnings.catch_warnings():
            # Two hints MLflow prints for every dataset that do not apply: it registers its local-artifact
            # source class twice (so "can be interpreted in multiple ways"), and it warns that integer
            # columns cannot hold missing values (subject folds and classes have none).
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted", category=UserWarning)
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer", category=UserWarning)
            dataset = mlflow.data.from_pandas(table, source=str(Path(self.p.store).resolve()), name=f"{self.p.store} mni",
                                              digest=self.digest)
            mlflow.log_input(dataset, context="training")
        flat = {**{k: v for k, v in asdict(self.spec).items() if k not in ("options", "augment")},
                **{f"option_{k}": v for k, v in self.spec.options.items()},
                **{f"augment_{k}": v for k, v in (self.spec.augment or {}).items()},
                **{k: v for k, v in asdict(self.p).items() if k not in ("models", "pipeline", "tracking_uri")},
                "subjects": len(self.data), "excluded": len(self.data.excluded), "grid": "x".join(map(str, self.shape)),
                "device_used": str(self.device), "amp_used": self.amp}
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})


class _SideBySide(torch.nn.Module):
    """The 27 single-patch networks as one module: outputs [B, 27, classes]. Their parameters are
    disjoint, so the summed loss trains each exactly as it would train alone."""

    def __init__(self, nets: torch.nn.ModuleList):
        super().__init__()
        self.nets = nets

    def forward(self, x):
        return torch.stack([n(x) for n in self.nets], dim=1)


def _training(job: tuple[str, Split], *, trainer: Trainer, threads: int):
    """One training of a run, in a worker process (or this one): ``kind`` "fold" or "final"."""
    torch.set_num_threads(threads)
    if trainer.p.deterministic:  # a worker process starts with torch's defaults
        torch.use_deterministic_algorithms(True, warn_only=True)
    kind, split = job
    result = trainer.fold_result(split) if kind == "fold" else trainer.final_result(split)
    # Pickled here: dask's own serialisation of an nn.Module rebuilds its hook registries (OrderedDicts) as
    # plain dicts, and registering a hook on the returned network (captum's LRP does) then fails.
    return pickle.dumps(result)


def code_digest() -> str:
    """sha256 of the models package's source. Part of the checkpoint key: a rerun with the same code resumes
    an interrupted training, but once the code changes (DVC reruns the stage because its deps did) fold
    results and checkpoints of the old code must not be reused as if the new code had produced them."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _seed_worker(worker_id: int) -> None:
    """Give each DataLoader worker its own augmentation stream (a copied seed would repeat the same
    random transforms in every worker)."""
    info = torch.utils.data.get_worker_info()
    augment = info.dataset.augment
    if augment is not None:
        augment.set_random_state(seed=info.seed % 2**32)


def summarise(folds: list[dict], baseline: list[dict]) -> dict[str, float]:
    """Mean and SD over folds of every numeric test metric and baseline metric."""
    out = {}
    for prefix, rows in (("", folds), ("baseline_", baseline)):
        for k in rows[0]:
            values = [r[k] for r in rows if isinstance(r.get(k), float)]
            if values and k not in ("best_epoch",):
                out[f"{prefix}{k}_mean"] = float(np.mean(values))
                out[f"{prefix}{k}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return out


# ---------------------------------------------------------------------------------------------- registry


def register(model: VolumeModel, name: str, report: TrainReport, spec: ModelSpec, p: TrainParams,
             untrained: bool = False) -> str:
    """Log `model` in the active run with its signature and register it as a new version of `name`."""
    import mlflow
    from mlflow.models import infer_signature

    example = torch.zeros(1, len(spec.inputs), *model.mask.shape)
    with torch.no_grad():
        signature = infer_signature(example.numpy(), model(example).numpy())
    # Pickled, not MLflow's default traced 'pt2' graph: extraction and attribution need the whole module
    # (embed, predict, the affine and the input maps), not just forward().
    info = mlflow.pytorch.log_model(model, name=name.removeprefix(REGISTRY_PREFIX), signature=signature,
                                    registered_model_name=name, serialization_format="pickle",
                                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    version = str(info.registered_model_version)
    metric, _ = SELECTION[spec.task]
    tags = {"task": spec.task, "architecture": spec.architecture, "folds": str(p.folds), "metric": metric,
            "cv_value": "" if untrained else f"{report.summary[f'{metric}_mean']:.6f}", "untrained": str(untrained).lower(),
            "inputs": ",".join(spec.inputs), "resolution_mm": str(p.resolution_mm), "basis": str(spec.basis),
            "highpass_mm": str(spec.highpass_mm), "bilateral": str(spec.bilateral).lower(),
            "covariates": ",".join(spec.covariates), "normalisation": spec.normalisation, "parcels": spec.parcels,
            "training_run": report.run_id}
    client = mlflow.MlflowClient()
    tags["volume_store_digest"] = client.get_run(report.run_id).data.tags.get("volume_store_digest", "")
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    return version


# Version tags two versions' metrics are compared on, with the value of versions registered before the tag.
COMPARABLE_ON = {"inputs": None, "resolution_mm": None, "volume_store_digest": None, "basis": "None", "highpass_mm": "None",
                 "bilateral": "false", "covariates": "", "normalisation": "map", "parcels": "bumps"}


def set_champion(name: str, version: str, metric: str | None, higher: bool) -> bool:
    """Give `version` the alias ``champion`` when its cross-validated metric beats the current champion's
    (or there is none; `metric` None: always). Metrics of models reading other input maps, another grid,
    other volumes (the store's digest: recomputed maps, new subjects) or the maps filtered or normalised
    otherwise are not comparable (a reconstruction error of T1 vs of log-Jacobian maps), nor are
    endophenotypes whose latent has other axes (`basis`, `parcels`: the same reconstruction error, other features):
    then the new version, which is what params.yaml and the store now hold, takes the alias. Returns
    whether it did."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        current = client.get_model_version_by_alias(name, "champion")
    except mlflow.exceptions.MlflowException:
        current = None
    tags = client.get_model_version(name, version).tags
    comparable = current is not None and all(current.tags.get(k, default) == tags.get(k, default)
                                                 for k, default in COMPARABLE_ON.items())
    if comparable and metric is not None and current.tags.get("cv_value"):
        new = float(tags["cv_value"])
        old = float(current.tags["cv_value"])
        if (new <= old) if higher else (new >= old):
            log.info("%s version %s (%s %.4f) does not beat champion version %s (%.4f)", name, version, metric, new,
                     current.version, old)
            return False
    client.set_registered_model_alias(name, "champion", version)
    return True


def train(p: TrainParams, name: str) -> TrainReport:
    """Train model `name` of ``p.models``: cross-validation, baselines, the final model, the registry."""
    return Trainer(p, model_spec(p, name)).run()
