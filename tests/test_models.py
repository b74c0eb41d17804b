"""Training, the leakage check, the MLflow registry and extraction, on a small synthetic volume store with
a planted group difference (real Zarr, real MLflow sqlite store, real Delta tables, real DuckDB)."""

from __future__ import annotations

import re
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import yaml

from conftest import ROOT, cli

SHAPE = (16, 18, 16)


def write_store(path: Path, participants: Path, n: int = 48, seed: int = 0, sessions: int = 0) -> None:
    """An MNI group like `endopheno preprocess` writes: AD subjects have a darker 'hippocampus' box, so a
    model can learn the diagnosis; `sessions` participants are scanned twice."""
    rng = np.random.default_rng(seed)
    subjects = [f"s{i:03d}" for i in range(n)]
    keys = subjects + [f"{s}_ses-2" for s in subjects[:sessions]]
    ad = {s: i % 2 for i, s in enumerate(subjects)}
    x = np.arange(SHAPE[0]) * 2.0 - 15
    mask = np.zeros(SHAPE, bool)
    mask[2:-2, 2:-2, 2:-2] = True
    # a few smooth anatomical modes (a low-dimensional cohort, as an autoencoder assumes) plus scanner noise
    from scipy.ndimage import gaussian_filter

    modes = np.stack([gaussian_filter(rng.normal(size=SHAPE), 2.0) for _ in range(4)])
    modes /= modes.std(axis=(1, 2, 3), keepdims=True)
    t1 = (np.einsum("sk,kxyz->sxyz", rng.normal(size=(len(keys), 4)), modes)
          + 0.3 * rng.normal(size=(len(keys), *SHAPE))).astype(np.float32)
    for k, key in enumerate(keys):
        t1[k, 4:9, 5:10, 4:9] -= 4.0 * ad[key.split("_ses-")[0]]
    t1 *= mask
    ds = xr.Dataset(
        {"T1w": (("subject", "x", "y", "z"), t1), "brain_mask": (("x", "y", "z"), mask),
         "qc_pass": ("subject", np.ones(len(keys), bool)), "source_sha256": ("subject", np.array([f"h{k}" for k in keys])),
         "template_to_native": (("subject", "r", "c"), np.tile(np.eye(4), (len(keys), 1, 1)))},
        coords={"subject": np.array(keys), "x": x, "y": np.arange(SHAPE[1]) * 2.0 - 17, "z": np.arange(SHAPE[2]) * 2.0 - 15},
        attrs={"affine": [[2, 0, 0, -15], [0, 2, 0, -17], [0, 0, 2, -15], [0, 0, 0, 1]], "params_digest": f"p{seed}"})
    ds.to_zarr(path, group="mni", mode="w")
    pd.DataFrame({"participant_id": [f"sub-{s}" for s in subjects], "age": rng.uniform(60, 85, n).round(1),
                  "sex": rng.choice(["F", "M"], n), "diagnosis": ["AD" if ad[s] else "CN" for s in subjects]}
                 ).to_csv(participants, sep="\t", index=False)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder with the synthetic store, params.yaml (tiny models, 2 folds) and features/."""
    root = tmp_path_factory.mktemp("project")
    write_store(root / "volumes.zarr", root / "participants.tsv")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    train = params["train"]
    train.update(store="volumes.zarr", participants="participants.tsv", checkpoints="models", folds=2,
                 resolution_mm=None, loader_workers=0, threads=1, workers=1, tracking_uri=f"sqlite:///{root}/mlflow.db")
    small = {"epochs": 12, "patience": 6, "batch_size": 8, "learning_rate": 5e-3}  # peak of the one-cycle schedule
    train["models"] = {
        "cnn3d": {"architecture": "cnn3d", "options": {"widths": [4, 8], "kernels": [3, 3], "hidden": 8}, **small},
        "patch27": {"architecture": "patch27", "options": {"widths": [4], "kernels": [3], "hidden": 4}, "top_k": 2,
                    "patch_epochs": 2, **small},
        "autoencoder3d": {"architecture": "autoencoder3d", "task": "reconstruction",
                          "options": {"latent": 128, "widths": [4, 8]}, "folds": 3, **small},   # its own fold count
    }
    params["extract"].update(volumes="volumes.zarr", store="features", loader_workers=0,
                             tracking_uri=f"sqlite:///{root}/mlflow.db")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "features").mkdir()
    for name in ("ae_t1", "ae_t1_random", "cnn3d_t1"):
        (root / "features" / f"{name}.yaml").write_text((ROOT / "features" / f"{name}.yaml").read_text())
    return root


def registry(root: Path) -> dict:
    """{(model, version): (aliases, tags)} read straight from the MLflow sqlite file."""
    con = sqlite3.connect(root / "mlflow.db")
    out = {}
    for name, version in con.execute("SELECT name, version FROM model_versions"):
        tags = dict(con.execute("SELECT key, value FROM model_version_tags WHERE name=? AND version=?", (name, version)))
        aliases = {a for (a,) in con.execute("SELECT alias FROM registered_model_aliases WHERE name=? AND version=?",
                                             (name, version))}
        out[(name, int(version))] = (aliases, tags)
    return out


def test_folds_group_sessions_and_a_leaky_split_fails(tmp_path):
    from sklearn.model_selection import KFold

    from endopheno.models.data import task_data
    from endopheno.models.splits import LeakageError, Split, check_split, outer_folds
    from endopheno.volumes.preprocess import open_mni

    write_store(tmp_path / "v.zarr", tmp_path / "p.tsv", n=40, sessions=20)
    data = task_data(open_mni(tmp_path / "v.zarr"), tmp_path / "p.tsv", "classification")
    assert len(data) == 60 and set(data.target) == {0.0, 1.0}
    splits = outer_folds(data.groups, data.strata, folds=5, seed=3)
    tested = np.concatenate([s.test for s in splits])
    assert sorted(tested) == list(range(60))          # every scan is tested exactly once
    for s in splits:
        check_split(s, data.groups)
        assert abs(data.target[s.test].mean() - 0.5) < 0.2   # stratified
    # A scan-level KFold ignores participants: the two sessions of someone land on both sides.
    leaky = [Split(k, tr[: len(tr) * 4 // 5], tr[len(tr) * 4 // 5:], te)
             for k, (tr, te) in enumerate(KFold(5, shuffle=True, random_state=0).split(data.groups))]
    with pytest.raises(LeakageError, match="in both"):
        for s in leaky:
            check_split(s, data.groups)


def test_a_rare_diagnosis_is_pooled_for_reconstruction_and_named_for_classification():
    from endopheno.errors import EndophenoError
    from endopheno.models.splits import outer_folds, pooled_strata

    groups = np.array([f"s{i}" for i in range(40)])
    strata = np.array([0] * 20 + [1] * 18 + [2, 3])          # CN, AD, one MCI, one not in participants.tsv
    with pytest.raises(EndophenoError, match="stratum 2 has 1"):
        outer_folds(groups, strata, folds=2)
    pooled = pooled_strata(strata, 2)
    assert (pooled[:38] == strata[:38]).all() and pooled[38] == pooled[39] not in (0, 1)
    assert sorted(np.concatenate([s.test for s in outer_folds(groups, pooled, folds=2)])) == list(range(40))
    alone = pooled_strata(np.array([0] * 20 + [1] * 19 + [2]), 2)   # a pool still too small joins the largest stratum
    assert alone[-1] == 0 and set(alone) == {0, 1}


def test_grid_affine_puts_pooled_voxels_at_the_centre_of_their_block():
    from endopheno.models.data import pool
    from endopheno.models.volume_model import model_grid_affine

    store = np.array([[2, 0, 0, -90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1.0]])
    pooled = model_grid_affine(store, 3)
    # pooled voxel (1, 2, 0) averages store voxels 3..5, 6..8, 0..2: its centre is store voxel (4, 7, 1)
    assert np.allclose(pooled @ [1, 2, 0, 1], store @ [4, 7, 1, 1])
    v = torch.arange(6 * 6 * 6, dtype=torch.float32).reshape(6, 6, 6)
    assert float(pool(v, 3)[1, 0, 0]) == pytest.approx(float(v[3:6, 0:3, 0:3].mean()))


def test_fit_resumes_from_its_checkpoint_and_is_deterministic(tmp_path):
    from endopheno.models.architectures import build
    from endopheno.models.train import ModelSpec, fit

    torch.manual_seed(0)
    x = torch.randn(24, 1, 8, 8, 8)
    y = (torch.arange(24) % 2).float()
    x[y == 1, :, 2:5, 2:5, 2:5] += 1.0
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True,
                                         generator=torch.Generator().manual_seed(1))
    spec = ModelSpec("t", "cnn3d", patience=100, options={"widths": [4, 4], "kernels": [3, 3], "hidden": 4})

    def run(epochs, checkpoint):
        torch.manual_seed(5)
        net = build("cnn3d", (8, 8, 8), 1, 2, **spec.options)
        loader.generator.manual_seed(1)
        return net, fit(net, loader, loader, task="classification", spec=spec, epochs=epochs, device=torch.device("cpu"),
                        amp=False, mask=torch.ones(8, 8, 8, dtype=torch.bool), checkpoint=checkpoint)

    net, straight = run(4, None)
    _, again = run(4, None)
    assert [h["train_loss"] for h in straight.history] == [h["train_loss"] for h in again.history]
    # trained in the channels-last layout, handed back (and registered) in the ordinary one
    conv = net.features[1][0].weight                                      # [4, 4, 3, 3, 3]
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last_3d)
    ckpt = tmp_path / "fold.pt"
    _, first = run(2, ckpt)
    assert first.epochs == 2 and ckpt.exists()
    _, resumed = run(4, ckpt)        # continues at epoch 3 instead of starting over
    assert resumed.epochs == 4 and len(resumed.history) == 4
    assert [h["train_loss"] for h in resumed.history[:2]] == [h["train_loss"] for h in first.history]

    # interrupted after epoch 2 of 4 and rerun: the same epochs, the same weights as without the interruption
    def crash(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    torch.manual_seed(5)
    loader.generator.manual_seed(1)
    with pytest.raises(KeyboardInterrupt):
        fit(build("cnn3d", (8, 8, 8), 1, 2, **spec.options), loader, loader, task="classification", spec=spec, epochs=4,
            device=torch.device("cpu"), amp=False, mask=torch.ones(8, 8, 8, dtype=torch.bool), checkpoint=tmp_path / "c.pt",
            on_epoch=crash)
    loader.generator.manual_seed(123)   # a fresh process would not have the interrupted one's generator state either
    torch.manual_seed(5)
    net_resumed = build("cnn3d", (8, 8, 8), 1, 2, **spec.options)
    again = fit(net_resumed, loader, loader, task="classification", spec=spec, epochs=4, device=torch.device("cpu"), amp=False,
                mask=torch.ones(8, 8, 8, dtype=torch.bool), checkpoint=tmp_path / "c.pt")
    assert [h["train_loss"] for h in again.history] == [h["train_loss"] for h in straight.history]
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net_resumed.state_dict().values()))


def test_training_from_memory_is_training_from_zarr(project):
    """`in_memory` changes where the epochs read the maps, not what a fold learns."""
    from endopheno.models.splits import outer_folds
    from endopheno.models.train import Trainer, load_train_params, model_spec
    from endopheno.params import load_params

    nets = []
    for in_memory in (True, False):
        params = load_params("train", project / "params.yaml")
        params.update(store=str(project / "volumes.zarr"), participants=str(project / "participants.tsv"),
                      in_memory=in_memory, loader_workers=1, tracking_uri=None)
        p = load_train_params(params)
        trainer = Trainer(p, model_spec(p, "cnn3d"))
        split = outer_folds(trainer.data.groups, trainer.data.strata, folds=2, seed=p.seed)[0]
        net, _, _, result, _ = trainer.train_split(split, 7, None, f"in_memory {in_memory}")
        nets.append((net, [h["train_loss"] for h in result.history]))
    (memory, losses), (streamed, streamed_losses) = nets
    assert len(losses) >= 3 and losses == streamed_losses
    for a, b in zip(memory.state_dict().values(), streamed.state_dict().values()):
        assert torch.equal(a, b)


def test_trainings_side_by_side_learn_what_they_learn_one_after_another(project, tmp_path):
    """Folds and the final model trained in worker processes (`workers`) give the networks and scores
    that training them in this process, one after another, gives."""
    from endopheno.models.splits import outer_folds
    from endopheno.models.train import Trainer, load_train_params, model_spec
    from endopheno.params import load_params

    runs = []
    for workers in (1, 2):
        params = load_params("train", project / "params.yaml")
        params.update(store=str(project / "volumes.zarr"), participants=str(project / "participants.tsv"),
                      checkpoints=str(tmp_path / f"models{workers}"), workers=workers, threads=1, tracking_uri=None)
        p = load_train_params(params)
        trainer = Trainer(p, model_spec(p, "cnn3d"))
        jobs = [("fold", s) for s in outer_folds(trainer.data.groups, trainer.data.strata, folds=2, seed=p.seed)]
        jobs.append(("final", trainer.final_split()))
        runs.append({(kind, split.fold): result for (kind, split), result in trainer.trainings(jobs)})
    one_by_one, side_by_side = runs

    def untimed(records):  # throughput differs from run to run, the rest must not
        return [{k: v for k, v in r.items() if not k.endswith("volumes_per_s")} for r in records]

    assert set(one_by_one) == set(side_by_side) == {("fold", 0), ("fold", 1), ("final", 0)}
    for fold in (0, 1):
        a, b = one_by_one[("fold", fold)], side_by_side[("fold", fold)]
        assert len(a["history"]) >= 3 and untimed(a["history"]) == untimed(b["history"])
        assert untimed([a["metrics"]]) == untimed([b["metrics"]])
        assert a["baseline"] == b["baseline"]
    final_a, final_b = one_by_one[("final", 0)][0], side_by_side[("final", 0)][0]
    for x, y in zip(final_a.state_dict().values(), final_b.state_dict().values()):
        assert torch.equal(x, y)
    final_b.register_forward_hook(lambda *_: None).remove()   # a whole module came back (attribution hooks into it)


def test_mixup_blends_each_subject_with_the_partner_whose_label_it_returns():
    from endopheno.models.train import _mixup

    torch.manual_seed(3)
    y = torch.arange(8).float()                      # label = the subject's index
    x = y[:, None, None, None, None].expand(-1, 1, 2, 2, 2).clone()   # every voxel holds it too
    mixed, partner, share = _mixup(x, y, 0.4)
    assert 0 < share < 1 and sorted(partner.tolist()) == y.tolist() and not torch.equal(partner, y)
    # each blended volume is share · own + (1 − share) · the partner named by the second label
    assert torch.allclose(mixed[:, 0, 0, 0, 0], share * y + (1 - share) * partner)


def test_fit_trains_2d_slice_networks_in_their_own_layout():
    """Channels-last 3D cannot hold a Conv2d's weights: slice2d trains in the default layout."""
    from endopheno.models.architectures import build, layout_of
    from endopheno.models.train import ModelSpec, fit

    x, y = torch.randn(8, 1, 8, 8, 8), (torch.arange(8) % 2).float()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    spec = ModelSpec("s", "slice2d", options={"widths": [4], "hidden": 4})
    net = build("slice2d", (8, 8, 8), 1, 2, **spec.options)
    assert layout_of(net) == torch.contiguous_format
    assert layout_of(build("cnn3d", (8, 8, 8), 1, 2, widths=[4], kernels=[3], hidden=4)) == torch.channels_last_3d
    result = fit(net, loader, loader, task="classification", spec=spec, epochs=1, device=torch.device("cpu"),
                 amp=False, mask=torch.ones(8, 8, 8, dtype=torch.bool))
    assert result.epochs == 1


@pytest.mark.slow
def test_train_cnn3d_registers_versions_with_champion_and_baseline(project):
    out = cli("train", "cnn3d", "--params", "params.yaml", cwd=project, check=0)
    assert "endopheno.cnn3d: balanced_accuracy" in out.stderr and "linear SVM baseline" in out.stderr
    reg = registry(project)
    aliases, tags = reg[("endopheno.cnn3d", 1)]
    assert aliases == {"champion"} and tags["task"] == "classification" and tags["folds"] == "2"
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    run = mlflow.get_run(tags["training_run"])
    # The planted difference is learned: ranked by AUC (on 5 validation subjects per fold the 0.5
    # threshold of balanced accuracy is itself noisy).
    assert run.data.metrics["auc_mean"] >= 0.8, out.stderr
    assert run.data.metrics["balanced_accuracy_mean"] == pytest.approx(float(tags["cv_value"]), abs=1e-6)
    assert "baseline_balanced_accuracy_mean" in run.data.metrics and "loader_volumes_per_s" in run.data.metrics
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "fold0_val_loss")
    assert len(history) >= 2                      # per-epoch metrics
    from endopheno.volumes.preprocess import open_mni, volume_store_digest

    digest = volume_store_digest(open_mni(project / "volumes.zarr"))
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [digest]
    assert run.data.tags["git_revision"]
    # a second version (other seed): the champion is whichever cross-validated better
    cli("train", "cnn3d", "--params", "params.yaml", "--epochs", "1", cwd=project, check=0)
    reg = registry(project)
    values = {v: float(reg[("endopheno.cnn3d", v)][1]["cv_value"]) for v in (1, 2)}
    champion = [v for v in (1, 2) if "champion" in reg[("endopheno.cnn3d", v)][0]]
    assert champion == [max(values, key=lambda v: (values[v], -v))]
    models = cli("models", "--tracking-uri", f"sqlite:///{project}/mlflow.db", cwd=project, check=0)
    assert "endopheno.cnn3d" in models.stdout and "champion" in models.stdout
    # A finished fold keeps its results and drops its weights; the final model's state stays for a rerun.
    for key in filter(Path.is_dir, (project / "models" / "cnn3d").iterdir()):
        assert sorted(f.name for f in key.glob("fold*")) == ["fold0.json", "fold1.json"]
        assert (key / "final.pt").exists()


@pytest.mark.slow
def test_a_moved_project_still_loads_its_registered_models(project, tmp_path):
    """MLflow records absolute artifact paths: a copy of the project whose original is gone must load
    its models from its own mlartifacts/, and a copy without them must say where they are missing."""
    import mlflow

    from endopheno.errors import InputError
    from endopheno.models.extract import load_model

    if not (project / "mlflow.db").exists() or ("endopheno.cnn3d", 1) not in registry(project):
        # pytest-xdist ran the training test on another worker, with its own project
        cli("train", "cnn3d", "--params", "params.yaml", "--epochs", "1", cwd=project, check=0)
    original = mlflow.MlflowClient(f"sqlite:///{project}/mlflow.db").get_model_version_download_uri("endopheno.cnn3d", "1")
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    weights = load_model("endopheno.cnn3d", "1").state_dict()
    copy = tmp_path / "elsewhere"
    shutil.copytree(project, copy)
    away = project / "mlartifacts.away"
    (project / "mlartifacts").rename(away)           # the recorded place is gone
    try:
        mlflow.set_tracking_uri(f"sqlite:///{copy}/mlflow.db")
        assert str(project) in mlflow.MlflowClient().get_model_version_download_uri("endopheno.cnn3d", "1") == original
        moved = load_model("endopheno.cnn3d", "1").state_dict()
        assert all(torch.equal(weights[k], moved[k]) for k in weights)
        shutil.rmtree(copy / "mlartifacts")
        with pytest.raises(InputError, match="endopheno.cnn3d/1: its artifacts are not at .*mlartifacts"):
            load_model("endopheno.cnn3d", "1")
    finally:
        away.rename(project / "mlartifacts")


@pytest.mark.slow
def test_autoencoder_beats_its_untrained_self_and_extraction_fills_the_sets(project):
    cli("train", "autoencoder3d", "--params", "params.yaml", cwd=project, check=0)
    reg = registry(project)
    assert "champion" in reg[("endopheno.autoencoder3d", 1)][0]
    assert "champion" in reg[("endopheno.autoencoder3d_untrained", 1)][0]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    run = mlflow.get_run(reg[("endopheno.autoencoder3d", 1)][1]["training_run"])
    m = run.data.metrics
    assert m["masked_mse_mean"] < 0.9 * m["baseline_masked_mse_mean"]
    # the model's `folds` overrides train.folds (2): three test folds, and the version says so
    assert reg[("endopheno.autoencoder3d", 1)][1]["folds"] == "3" and "fold2_val_loss" in m and "fold3_val_loss" not in m

    out = cli("extract", "--feature-set", "ae_t1", "--params", "params.yaml", cwd=project, check=0)
    assert "new version 0" in out.stderr
    again = cli("extract", "--feature-set", "ae_t1", "--params", "params.yaml", cwd=project, check=0)
    assert "unchanged" in again.stderr                # same model version, same volumes: no new version
    cli("extract", "--feature-set", "ae_t1_random", "--params", "params.yaml", cwd=project, check=0)
    from deltalake import DeltaTable

    table = DeltaTable(str(project / "features" / "ae_t1")).to_pyarrow_table()
    assert table.num_rows == 48 and "f127" in table.column_names and "f128" not in table.column_names
    assert set(table["model_name"].to_pylist()) == {"endopheno.autoencoder3d"}
    assert set(table["model_version"].to_pylist()) == {"1"}
    meta = DeltaTable(str(project / "features" / "ae_t1")).history(1)[0]
    assert meta["model_version"] == "1" and meta["model_name"] == "endopheno.autoencoder3d"
    trained = np.column_stack([table[f"f{d:03d}"].to_numpy() for d in range(128)])
    random = DeltaTable(str(project / "features" / "ae_t1_random")).to_pyarrow_table()
    assert not np.allclose(trained, np.column_stack([random[f"f{d:03d}"].to_numpy() for d in range(128)]))


@pytest.mark.slow
def test_patch27_extracts_with_a_bad_subject_reported_and_the_rest_written(project, tmp_path):
    import shutil

    import zarr

    out = cli("train", "patch27", "--params", "params.yaml", cwd=project, check=0)
    assert "chosen on validation AUC" in out.stderr and "endopheno.patch27: balanced_accuracy" in out.stderr
    missing = cli("extract", "--feature-set", "cnn3d_t1", "--model", "endopheno.nothing@champion", "--params", "params.yaml",
                  cwd=project, check=2)
    assert "endopheno.nothing@champion" in missing.stderr and "registered" in missing.stderr
    copy = tmp_path / "copy"
    shutil.copytree(project, copy, ignore=shutil.ignore_patterns("mlflow.db", "models"))
    zarr.open_group(copy / "volumes.zarr", mode="r+", path="mni")["T1w"][3, 5, 5, 5] = np.nan
    out = cli("extract", "--feature-set", "cnn3d_t1", "--model", "endopheno.patch27@champion", "--params", "params.yaml",
              cwd=copy, check=1)
    assert "s003" in out.stderr and "non-finite" in out.stderr
    from deltalake import DeltaTable

    table = DeltaTable(str(copy / "features" / "cnn3d_t1")).to_pyarrow_table()
    assert table.num_rows == 47 and "s003" not in table["subject_id"].to_pylist()
    p_ad = np.asarray(table["p_ad"].to_numpy())
    ad = np.array([int(s[1:]) % 2 for s in table["subject_id"].to_pylist()])
    assert ((p_ad >= 0) & (p_ad <= 1)).all() and p_ad[ad == 1].mean() > p_ad[ad == 0].mean()

    # The same grid's shape with another origin: refused in one line, not read 8 mm off
    from endopheno.volumes.store import publish

    mni = zarr.open_group(copy / "volumes.zarr", mode="r+", path="mni")
    shifted = np.asarray(mni.attrs["affine"])
    shifted[0, 3] += 8
    mni.attrs["affine"] = shifted.tolist()
    publish(copy / "volumes.zarr")
    refused = cli("extract", "--feature-set", "cnn3d_t1", "--model", "endopheno.patch27@champion", "--params", "params.yaml",
                  cwd=copy, check=2)
    assert "origin" in refused.stderr and "retrain" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_normalisation_fitted_beyond_the_training_subjects_fails_the_run(project, monkeypatch):
    from endopheno.models.data import covariate_effects, fit_normalisation
    from endopheno.models.splits import LeakageError, outer_folds
    from endopheno.models.train import Trainer, load_train_params, model_spec

    monkeypatch.chdir(project)
    section = yaml.safe_load((project / "params.yaml").read_text())["train"]
    section["models"]["cnn3d"]["epochs"] = 1
    p = load_train_params(section)
    trainer = Trainer(p, model_spec(p, "cnn3d"))
    split = outer_folds(trainer.data.groups, trainer.data.strata, folds=2, seed=1)[0]
    *_, result, _ = trainer.train_split(split, 1, None, "honest")
    assert result.epochs == 1
    # The classic leak: statistics of every subject, test fold included (Wen et al. 2020).
    monkeypatch.setattr(Trainer, "normalisation", lambda self, rows, effects=None: fit_normalisation(self.volumes, self.mask))
    with pytest.raises(LeakageError, match="not those of the fold's"):
        trainer.train_split(split, 1, None, "leaky")
    monkeypatch.undo()
    monkeypatch.chdir(project)
    # covariate effects fitted on every subject (the test fold's too) are caught the same way
    section["models"]["cnn3d"]["covariates"] = ["age"]
    p = load_train_params(section)
    trainer = Trainer(p, model_spec(p, "cnn3d"))
    trainer.train_split(split, 1, None, "honest")
    monkeypatch.setattr(Trainer, "adjustment", lambda self, split: covariate_effects(self.volumes, self.design, np.arange(len(self.data))))
    with pytest.raises(LeakageError, match="not those of the fold's"):
        trainer.train_split(split, 1, None, "leaky")


def test_checkpoints_of_other_code_or_other_participants_are_not_resumed(project, monkeypatch, tmp_path):
    from dataclasses import replace

    from endopheno.models import train
    from endopheno.models.train import Trainer, load_train_params, model_spec

    monkeypatch.chdir(project)
    p = load_train_params(yaml.safe_load((project / "params.yaml").read_text())["train"])
    same = [Trainer(p, model_spec(p, "cnn3d")).checkpoints for _ in range(2)]
    assert same[0] == same[1]                        # an interrupted run resumes where it stopped
    # One diagnosis corrected in the participants' table: DVC reruns the stage, and the folds must not
    # be skipped as "done in an earlier run" with the old labels.
    table = pd.read_csv(project / "participants.tsv", sep="\t")
    table.loc[0, "diagnosis"] = "CN" if table.loc[0, "diagnosis"] == "AD" else "AD"
    table.to_csv(corrected := tmp_path / "participants.tsv", sep="\t", index=False)
    assert Trainer(replace(p, participants=str(corrected)), model_spec(p, "cnn3d")).checkpoints != same[0]
    monkeypatch.setattr(train, "code_digest", lambda: "the models package, edited")
    assert Trainer(p, model_spec(p, "cnn3d")).checkpoints != same[0]


def test_a_network_that_never_beats_chance_is_retried_and_a_learning_one_is_not(project, monkeypatch, caplog):
    from endopheno.models.splits import outer_folds
    from endopheno.models.train import Trainer, load_train_params, model_spec

    monkeypatch.chdir(project)
    section = yaml.safe_load((project / "params.yaml").read_text())["train"]
    # Diagnoses shuffled away from the images: nothing to learn, so validation never beats chance.
    table = pd.read_csv("participants.tsv", sep="\t")
    table["diagnosis"] = table.diagnosis.sample(frac=1, random_state=3).to_numpy()
    table.to_csv("shuffled.tsv", sep="\t", index=False)
    runs = {}
    for name, participants in (("stuck", "shuffled.tsv"), ("learning", "participants.tsv")):
        section["models"][name] = {**section["models"]["cnn3d"], "epochs": 4}
        p = load_train_params({**section, "participants": participants})
        trainer = Trainer(p, model_spec(p, name))
        split = outer_folds(trainer.data.groups, trainer.data.strata, folds=2, seed=1)[0]
        caplog.clear()
        *_, result, info = trainer.train_split(split, 1, None, name)
        runs[name] = (info["restarts"], result.best_loss, trainer.chance_loss(split.train), caplog.text)
    restarts, loss, chance, text = runs["stuck"]
    # (what the retry reaches on a validation split this small is luck: only that it was made is tested)
    assert restarts == 1 and "never beat chance" in text
    restarts, loss, chance, text = runs["learning"]
    assert restarts == 0 and loss < 0.98 * chance and "never beat chance" not in text


def test_number_knobs_written_without_a_dot_are_numbers_and_words_are_refused():
    from endopheno.errors import EndophenoError
    from endopheno.models.train import ModelSpec
    from endopheno.params import from_section

    section = yaml.safe_load("learning_rate: 3e-4\nepochs: 1e1\n")   # YAML 1.1 reads both as strings
    assert isinstance(section["learning_rate"], str)
    spec = from_section(ModelSpec, {"name": "m", "architecture": "cnn3d", **section}, "train.models.m")
    assert spec.learning_rate == pytest.approx(3e-4) and spec.epochs == 10 and isinstance(spec.epochs, int)
    with pytest.raises(EndophenoError, match="train.models.m.learning_rate: 'fast' is not a number"):
        from_section(ModelSpec, {"name": "m", "architecture": "cnn3d", "learning_rate": "fast"}, "train.models.m")
    with pytest.raises(EndophenoError, match="epochs: '2.5' is not a whole number"):
        from_section(ModelSpec, {"name": "m", "architecture": "cnn3d", "epochs": "2.5"}, "train.models.m")


def test_the_svr_baseline_predicts_a_target_far_from_zero_in_its_units():
    """Ages around 72: an SVR fitted on the raw target, its intercept penalised, predicted ~20 years (MAE 49)."""
    from endopheno.models.splits import Split
    from endopheno.models.train import linear_baseline

    rng = np.random.default_rng(0)
    voxels = rng.standard_normal((120, 300))
    age = 72 + 6 * voxels[:, :10].mean(1) * np.sqrt(10) + rng.normal(0, 1, 120)   # SD ~6 years around 72
    split = Split(0, np.arange(0, 80), np.arange(80, 100), np.arange(100, 120))
    svr = linear_baseline("regression", voxels, age, split, (1e-4, 1e-3, 1e-2, 1e-1))
    assert svr["mae"] < 0.8 * age.std() and svr["r"] > 0.4, svr   # 300 voxels, 80 subjects: a weak fit, but in years



def test_champion_is_only_compared_on_the_same_inputs_grid_and_volumes(tmp_path):
    """A worse version on the same volumes stays behind the champion; a version trained after the volumes
    changed (recomputed maps, new subjects) or whose latent has other axes takes the alias whatever
    its metric: the old one's is moot."""
    import mlflow

    from endopheno.models.train import set_champion

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    client.create_registered_model("endopheno.m")

    def version(cv: float, digest: str, basis: str = "None", **more) -> str:
        tags = {"inputs": "logjac", "resolution_mm": "6.0", "volume_store_digest": digest, "cv_value": str(cv),
                "basis": basis, **more}
        return client.create_model_version("endopheno.m", str(tmp_path), tags=tags).version

    def champion() -> str:
        return client.get_model_version_by_alias("endopheno.m", "champion").version

    first = version(0.30, "a")
    assert set_champion("endopheno.m", first, "masked_mse", higher=False) and champion() == first
    worse = version(0.40, "a")
    assert not set_champion("endopheno.m", worse, "masked_mse", higher=False) and champion() == first
    other_volumes = version(0.50, "b")
    assert set_champion("endopheno.m", other_volumes, "masked_mse", higher=False) and champion() == other_volumes
    components = version(0.50, "b", basis="ica")     # the same error, other features
    assert set_champion("endopheno.m", components, "masked_mse", higher=False) and champion() == components
    # a version registered before the filter and normalisation tags had their defaults: still compared
    defaults = version(0.55, "b", basis="ica", highpass_mm="None", normalisation="map")
    assert not set_champion("endopheno.m", defaults, "masked_mse", higher=False) and champion() == components
    # the error of high-passed, voxel-normalised maps is in other units: not compared
    filtered = version(0.60, "b", basis="ica", highpass_mm="12.0", normalisation="voxel")
    assert set_champion("endopheno.m", filtered, "masked_mse", higher=False) and champion() == filtered


def test_independent_components_do_not_depend_on_the_axes_the_code_came_with():
    """Sparse spatial sources seen through a code: the same network with its code mixed by another
    invertible map gives the same components, in the same order and sign."""
    from endopheno.models.basis import independent_components

    rng = np.random.default_rng(0)
    n, k, voxels = 200, 6, 500
    maps = rng.laplace(size=(k, voxels)) * (rng.random((k, voxels)) < 0.2)   # sparse, non-Gaussian
    loadings = rng.normal(size=(n, k))
    inputs = loadings @ maps + 0.1 * rng.normal(size=(n, voxels))
    codes = loadings @ rng.normal(size=(k, k)) + 3.0
    mixed = codes @ rng.normal(size=(k, k))
    a = [(z - m) @ t for z in (codes, mixed) for m, t in [independent_components(z, inputs)]]
    assert np.allclose(a[0], a[1], atol=1e-3)
    assert np.allclose(a[0].std(0, ddof=1), 1) and np.allclose(a[0].mean(0), 0, atol=1e-9)
    # each component is one of the planted sources (up to the noise of 200 subjects); the code's axes were not
    match = lambda z: np.abs(np.corrcoef(z.T, loadings.T)[:k, k:])   # noqa: E731
    assert match(codes).max(1).min() < 0.8
    assert (match(a[0]).max(1) > 0.93).all() and sorted(match(a[0]).argmax(1)) == list(range(k))
    with pytest.raises(ValueError, match="more than 6 subjects"):
        independent_components(codes[:6], inputs[:6])


def test_a_folded_basis_keeps_reconstructions():
    from endopheno.models.architectures import build
    from endopheno.models.basis import fold_into

    torch.manual_seed(0)
    net = build("autoencoder3d", (8, 8, 8), latent=6, widths=[4, 8]).eval()
    x = torch.randn(40, 1, 8, 8, 8)
    with torch.no_grad():
        code = net.encode(x)
        before = net.decode(code)
    mean, a = code.double().numpy().mean(0), np.random.default_rng(1).normal(size=(6, 6))
    fold_into(net, mean, a)
    with torch.no_grad():
        new = net.encode(x)
        after = net.decode(new)
    assert torch.allclose(after, before, atol=1e-4)
    assert np.allclose(new.double().numpy(), (code.double().numpy() - mean) @ a, atol=1e-4)


def test_highpass_removes_smooth_variation_keeps_a_region_and_matches_scipy():
    from scipy.ndimage import gaussian_filter

    from endopheno.models.data import highpass

    mask = np.zeros((20, 22, 18), bool)
    mask[2:18, 3:20, 2:16] = True
    x, y, z = np.meshgrid(*[np.arange(n, dtype=float) for n in mask.shape], indexing="ij")
    smooth = 0.3 + 0.02 * x - 0.01 * y                    # a brain-wide gradient
    region = np.where((abs(x - 10) < 2) & (abs(y - 11) < 2) & (abs(z - 9) < 2), -0.2, 0.0)   # a 27-voxel atrophy
    out = highpass(torch.from_numpy(np.stack([smooth, smooth + region]))[:, None], torch.from_numpy(mask), 2.0).numpy()[:, 0]
    inner = np.zeros_like(mask)
    inner[8:12, 9:14, 7:11] = True                        # away from the mask's edge
    assert np.abs(out[0][inner]).max() < 1e-6 and (out[:, ~mask] == 0).all()
    assert (out[1] - out[0])[10, 11, 9] < -0.1            # the region's own change stays
    # the oracle: scipy's Gaussian filter, normalised by the filtered mask the same way
    v = smooth + region
    expected = (v - gaussian_filter(v * mask, 2.0, mode="constant", truncate=3) /
                np.maximum(gaussian_filter(mask.astype(float), 2.0, mode="constant", truncate=3), 1e-6)) * mask
    assert np.allclose(out[1], expected, atol=1e-9)


def test_voxel_normalisation_is_each_voxels_own_over_the_subjects():
    from endopheno.errors import InputError
    from endopheno.models.data import fit_normalisation

    rng = np.random.default_rng(0)
    volumes = torch.from_numpy(rng.normal(2.0, 3.0, (30, 1, 4, 5, 6)))
    mask = torch.zeros(4, 5, 6, dtype=torch.bool)
    mask[1:3, 1:4, 1:5] = True
    mean, sd = fit_normalisation(volumes, mask, "voxel")
    v = volumes.numpy()
    assert mean.shape == (1, 4, 5, 6) and np.allclose(mean[0][mask], v.mean(0)[0][mask.numpy()], atol=1e-5)
    assert np.allclose(sd[0][mask], v.std(0)[0][mask.numpy()], atol=1e-5) and (sd[0][~mask] == 1).all()
    per_map = fit_normalisation(volumes, mask)
    assert per_map[0].shape == (1, 1, 1, 1)
    with pytest.raises(InputError, match="map or voxel"):
        fit_normalisation(volumes, mask, "subject")


def test_training_with_an_ica_basis_registers_it_and_refuses_a_tiny_cohort(project):
    """With every input option of the default autoencoder (high-pass, voxel normalisation, ICA basis):
    the registered model reads the store's volumes exactly as training did, so the codes of the final
    model's subjects have the basis's mean 0 and SD 1."""
    from endopheno.models.extract import load_model

    params = yaml.safe_load((project / "params.yaml").read_text())
    ae = {"architecture": "autoencoder3d", "task": "reconstruction", "basis": "ica", "folds": 2, "epochs": 2,
          "patience": 2, "batch_size": 8, "highpass_mm": 4.0, "normalisation": "voxel"}
    params["train"]["models"].update(ae_ica={**ae, "options": {"latent": 8, "widths": [4, 8]}},
                                     ae_too_wide={**ae, "options": {"latent": 48, "widths": [4, 8]}})
    (project / "params_basis.yaml").write_text(yaml.safe_dump(params))
    refused = cli("train", "ae_too_wide", "--params", "params_basis.yaml", cwd=project, check=2)
    assert "basis" in refused.stderr and "48" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    cli("train", "ae_ica", "--params", "params_basis.yaml", cwd=project, check=0)
    assert registry(project)[("endopheno.ae_ica", 1)][1]["basis"] == "ica"
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    model = load_model("endopheno.ae_ica", "1")
    volumes = torch.from_numpy(xr.open_zarr(project / "volumes.zarr", group="mni")["T1w"].values[:, None])
    z = model.predict(volumes).double().numpy()     # the final model was fitted on all 48 subjects
    assert np.allclose(z.mean(0), 0, atol=1e-3) and np.allclose(z.std(0, ddof=1), 1, atol=1e-3)


def test_a_parcel_autoencoder_trains_registers_and_starts_its_parcels_inside_the_brain(project):
    """`options.bottleneck: parcels` from the CLI: the trainer starts the parcels at k-means centres of
    its brain mask, the registered model codes the store's volumes, and an ICA basis is refused (it would
    mix the dimensions that each parcel owns). `parcels: ward` starts them as a hard parcellation instead,
    the untrained copy still as bumps."""
    from endopheno.models.data import brain_mask
    from endopheno.models.extract import load_model

    params = yaml.safe_load((project / "params.yaml").read_text())
    ae = {"architecture": "autoencoder3d", "task": "reconstruction", "folds": 2, "epochs": 2, "patience": 2,
          "batch_size": 8, "options": {"latent": 8, "widths": [4], "bottleneck": "parcels"}}
    params["train"]["models"].update(ae_parcels=ae, ae_parcels_ica={**ae, "basis": "ica"}, ae_ward={**ae, "parcels": "ward"})
    (project / "params_parcels.yaml").write_text(yaml.safe_dump(params))
    refused = cli("train", "ae_parcels_ica", "--params", "params_parcels.yaml", cwd=project, check=2)
    assert "parcels" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    cli("train", "ae_parcels", "--params", "params_parcels.yaml", cwd=project, check=0)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    model = load_model("endopheno.ae_parcels", "1")
    ds = xr.open_zarr(project / "volumes.zarr", group="mni")
    z = model.predict(torch.from_numpy(ds["T1w"].values[:, None])).numpy()
    assert z.shape == (ds.sizes["subject"], 8) and np.isfinite(z).all() and (z.std(0) > 0).all()
    mask = brain_mask(ds, 1).numpy()
    centres = model.net.config["parcel_centres"]
    assert len(centres) == 8 and all(mask[tuple(round(c) for c in p)] for p in centres)

    def half_max_share(model):  # weight within each parcel's half-maximum: ~0.3 for a 3D Gaussian bump, ~1 for a hard parcel
        w = model.net.encoder[-1].weights()
        return torch.where(w >= 0.5 * w.amax(1, keepdim=True), w, 0).sum(1)

    assert (half_max_share(model) < 0.6).all()
    cli("train", "ae_ward", "--params", "params_parcels.yaml", cwd=project, check=0)
    ward = load_model("endopheno.ae_ward", "1")
    assert (half_max_share(ward) > 0.95).all()   # started as Ward parcels of the training maps
    assert (half_max_share(load_model("endopheno.ae_ward_untrained", "1")) < 0.6).all()   # its untrained copy keeps the bumps

    # A second training that does not beat the champion: the untrained champion stays the champion's twin
    cli("train", "ae_ward", "--params", "params_parcels.yaml", "--epochs", "1", cwd=project, check=0)
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("endopheno.ae_ward", "champion")
    twin = client.get_model_version_by_alias("endopheno.ae_ward_untrained", "champion")
    assert str(champion.version) == "1", "the one-epoch version was expected to reconstruct worse"
    assert str(twin.version) == "1" and twin.tags["trained_version"] == "1" and twin.tags["training_run"] == champion.tags["training_run"]
    assert client.get_model_version("endopheno.ae_ward_untrained", "2").tags["trained_version"] == "2"


def test_bilateral_maps_mirror_about_the_midline_not_the_grid_centre():
    from endopheno.errors import InputError
    from endopheno.models.data import bilateral, midline_of

    # A 6 mm grid pooled from a 2 mm one runs from x = -76 to +80 mm: its centre is not the midline.
    affine = np.diag([6.0, 6.0, 6.0, 1.0])
    affine[:3, 3] = [-76.0, -100.0, -50.0]
    x_mm = affine[0, 0] * np.arange(27) + affine[0, 3]
    midline = midline_of(affine)
    assert np.isclose(affine[0, 0] * midline + affine[0, 3], 0.0)
    # |x| is its own mirror image about x = 0 wherever the grid's voxels fall (away from the kink at 0,
    # which linear interpolation rounds; a flip of the array reflects about x = +2 mm and misses by 4)
    even = torch.from_numpy(np.broadcast_to(np.abs(x_mm)[:, None, None], (27, 4, 3)).astype(np.float32)).clone()
    inside = torch.from_numpy(np.abs(x_mm) <= 74)   # the mirror point lies on the grid (x >= -76)
    away = inside & torch.from_numpy(np.abs(x_mm) >= 6)
    assert torch.allclose(bilateral(even[None, None], midline)[0, 0][away], even[away], atol=1e-4)
    assert (((even + even.flip(0)) / 2 - even)[away].abs() > 1).all()
    # an odd map (x itself) has no bilateral part
    odd = torch.from_numpy(np.broadcast_to(x_mm[:, None, None], (27, 4, 3)).astype(np.float32)).clone()
    assert bilateral(odd, midline)[inside].abs().max() < 1e-4
    with pytest.raises(InputError, match="left-right"):
        midline_of(np.array([[0, 2, 0, 0], [2, 0, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1.0]]))


def test_a_bilateral_model_reads_a_subject_and_its_mirror_image_alike(project):
    from endopheno.models.architectures import build
    from endopheno.models.data import VolumeDataset, bilateral
    from endopheno.models.train import Trainer, load_train_params, model_spec

    section = yaml.safe_load((project / "params.yaml").read_text())["train"]
    section.update(store=str(project / "volumes.zarr"), participants=str(project / "participants.tsv"), tracking_uri=None)
    section["models"]["cnn3d"]["bilateral"] = True
    p = load_train_params(section)
    tr = Trainer(p, model_spec(p, "cnn3d"))
    model = tr.volume_model(build("cnn3d", tr.shape, 1, 2, widths=(4, 8), kernels=(3, 3), hidden=8).eval(),
                            tr.normalisation(np.arange(len(tr.volumes))), (0.0, 1.0))
    x = torch.stack([VolumeDataset(p.store, tr.data.rows[:2], tr.data.target[:2], factor=tr.factor).volume(i) for i in range(2)])
    mirrored = 2 * bilateral(x, tr.midline) - x      # the mirror image itself
    assert not torch.allclose(x * tr.mask, mirrored * tr.mask, atol=1e-2)   # the subjects are not symmetric
    assert torch.allclose(model.predict(x, "probability"), model.predict(mirrored, "probability"), atol=1e-5)
    # the trainer's own maps (what the folds and the SVM baseline read) are the bilateral ones
    assert torch.allclose(tr.volumes[:2], bilateral(x, tr.midline) * tr.mask, atol=1e-6)


def test_covariate_effects_come_from_the_reference_controls_and_leave_the_disease_in():
    from endopheno.models.data import adjusted, covariate_effects

    rng = np.random.default_rng(0)
    n, shape = 200, (1, 3, 4, 5)
    ad = np.arange(n) % 2
    age = rng.normal(73, 7, n) + 5 * ad            # patients older, as in real cohorts
    slope, atrophy = torch.randn(shape), torch.randn(shape)
    maps = (torch.from_numpy(age - 73).float()[:, None, None, None, None] * slope + torch.from_numpy(ad).float()[:, None, None, None, None]
            * atrophy + 0.1 * torch.randn(n, *shape))
    controls = np.flatnonzero(ad == 0)
    effects = covariate_effects(maps, age[:, None], controls)
    assert effects.shape == (1, *shape) and torch.allclose(effects[0], slope, atol=0.01)
    # fitted on everyone, the atrophy of the older patients is taken for age (Dukart et al. 2011)
    assert not torch.allclose(covariate_effects(maps, age[:, None], np.arange(n))[0], slope, atol=0.05)
    # what is not a reference subject does not move the fit
    changed = maps.clone()
    changed[ad == 1] += 100
    assert torch.equal(covariate_effects(changed, age[:, None], controls), effects)
    corrected = adjusted(maps, age[:, None], effects)
    assert abs(np.corrcoef(age[controls], corrected[controls, 0, 1, 2, 3])[0, 1]) < 0.2
    patients = corrected[ad == 1].mean(0) - corrected[ad == 0].mean(0)
    assert torch.allclose(patients, atrophy, atol=0.1)   # the disease's effect is what is left


def test_covariate_design_codes_text_as_levels_and_names_a_participant_without_a_value():
    from endopheno.errors import InputError
    from endopheno.models.data import covariate_design

    table = pd.DataFrame({"age": [70.0, 80.0, 75.0], "sex": ["M", "F", "M"], "site": ["a", "b", "c"]}, index=["p1", "p2", "p3"])
    design, levels = covariate_design(table, ["age", "sex", "site"])
    assert levels == {"age": [], "sex": ["F", "M"], "site": ["a", "b", "c"]}
    assert design.tolist() == [[70, 1, 0, 0], [80, 0, 1, 0], [75, 1, 0, 1]]
    other, _ = covariate_design(pd.DataFrame({"age": [60.0], "sex": ["F"], "site": ["c"]}, index=["p9"]), ["age", "sex", "site"], levels)
    assert other.tolist() == [[60, 0, 0, 1]]                 # coded as the training subjects were
    with pytest.raises(InputError, match="participant p9.*site 'd' is none of"):
        covariate_design(pd.DataFrame({"age": [60.0], "sex": ["F"], "site": ["d"]}, index=["p9"]), ["age", "sex", "site"], levels)
    with pytest.raises(InputError, match="participant p2: has no age"):
        covariate_design(table.assign(age=[70.0, np.nan, 75.0]), ["age"])


def test_a_model_trained_with_covariates_is_given_them_again_at_extraction(project, tmp_path):
    import mlflow
    from deltalake import DeltaTable

    from endopheno.models.data import VolumeDataset, adjusted
    from endopheno.models.extract import load_model

    root = covariates_project(project, tmp_path / "covariates", epochs=2)
    table = pd.read_csv(project / "participants.tsv", sep="\t")
    table.loc[3, "age"] = np.nan                      # one participant without an age
    table.to_csv(root / "participants.tsv", sep="\t", index=False)

    trained = cli("train", "cnn3d", "--params", "params.yaml", cwd=root, check=0)
    assert "1 subjects left out (first: s003: age missing)" in trained.stderr
    assert registry(root)[("endopheno.cnn3d", 1)][1]["covariates"] == "age"
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    model = load_model("endopheno.cnn3d", "1")
    assert model.covariates == {"age": []} and model.covariate_effects.shape == (1, 1, *SHAPE)
    assert model.covariate_effects.abs().max() > 0

    out = cli("extract", "--feature-set", "cnn3d_t1", "--params", "params.yaml", cwd=root, check=1)
    assert re.search(r"failed subject s003: .*no age in participants.tsv", out.stderr)   # reported, the others extracted
    rows = DeltaTable(str(root / "features" / "cnn3d_t1")).to_pyarrow_table().to_pandas().set_index("subject_id")
    assert len(rows) == 47 and "s003" not in rows.index
    x = VolumeDataset(root / "volumes.zarr", np.arange(2), np.zeros(2), inputs=model.inputs).volume(0)[None]
    age = table.set_index("participant_id").loc[["sub-s000"], ["age"]].to_numpy()
    expected = model.predict(adjusted(x, age, model.covariate_effects), "probability").item()
    assert rows.at["s000", "p_ad"] == pytest.approx(expected, abs=1e-5)
    assert model.predict(x, "probability").item() != pytest.approx(expected, abs=1e-5)   # the age was removed


def covariates_project(project: Path, root: Path, epochs: int) -> Path:
    """A copy of `project` (volumes, feature definitions) with its own MLflow store, whose cnn3d is
    trained with the covariate age (participants.tsv is the caller's to write)."""
    root.mkdir()
    for name in ("volumes.zarr", "features"):
        shutil.copytree(project / name, root / name)
    params = yaml.safe_load((project / "params.yaml").read_text())
    uri = f"sqlite:///{root}/mlflow.db"
    params["train"].update(tracking_uri=uri, final_model=True)
    params["train"]["models"]["cnn3d"].update(covariates=["age"], epochs=epochs)
    params["extract"].update(tracking_uri=uri, participants="participants.tsv")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def test_extraction_rows_carry_the_subject_and_the_session_apart():
    """The MNI row label "<id>_ses-<s>" becomes subject_id and session: the catalog joins on the subject."""
    from endopheno.featurestore.definitions import definitions
    from endopheno.models.extract import to_table

    defn = definitions(ROOT / "features")["cnn3d_t1"]
    labels = ["s000_ses-1", "s000_ses-2", "s001"]
    results = {"embedding": np.zeros((3, 2), np.float32), "probability": np.array([0.1, 0.2, 0.3], np.float32)}
    table = to_table(defn, labels, results, "endopheno.cnn3d", "1")
    assert table["subject_id"].to_pylist() == ["s000", "s000", "s001"]
    assert table["session"].to_pylist() == ["1", "2", None]


def test_a_version_with_a_failed_subject_is_completed_by_the_next_extraction(project, tmp_path):
    """The commit records the failed subjects and the participants' sha256; with the same inputs, the
    next extraction is not 'unchanged' while a subject is missing, and measures it; the failure is
    printed once per subject."""
    import hashlib

    import zarr
    from deltalake import DeltaTable

    root = covariates_project(project, tmp_path / "failed", epochs=1)
    shutil.copy(project / "participants.tsv", root / "participants.tsv")
    cli("train", "cnn3d", "--params", "params.yaml", cwd=root, check=0)

    t1 = zarr.open_group(root / "volumes.zarr", mode="r+", path="mni")["T1w"]
    voxel = t1[3, 5, 5, 5]
    t1[3, 5, 5, 5] = np.nan                     # s003 unreadable; the store's digest does not change
    out = cli("extract", "--feature-set", "cnn3d_t1", "--params", "params.yaml", cwd=root, check=1)
    assert "failed subject s003: its MNI volume has non-finite" in out.stderr and out.stderr.count("s003") == 1
    meta = DeltaTable(str(root / "features" / "cnn3d_t1")).history(1)[0]
    assert meta["failed_subjects"] == '["s003"]'
    assert meta["participants_sha256"] == hashlib.sha256((root / "participants.tsv").read_bytes()).hexdigest()

    t1[3, 5, 5, 5] = voxel
    again = cli("extract", "--feature-set", "cnn3d_t1", "--params", "params.yaml", cwd=root, check=0)
    assert "new version 1" in again.stderr
    table = DeltaTable(str(root / "features" / "cnn3d_t1"))
    assert table.to_pyarrow_table().num_rows == 48 and table.history(1)[0]["failed_subjects"] == "[]"
    assert "unchanged" in cli("extract", "--feature-set", "cnn3d_t1", "--params", "params.yaml", cwd=root, check=0).stderr
