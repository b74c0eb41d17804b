"""`endopheno attribute` end to end on tiny registered models (a real Zarr store, a real MLflow sqlite registry,
real NIfTI files and a real DuckDB catalog): heatmaps, their checks and scores of a cnn3d, a method that does
not apply reported, an autoencoder's latent-to-region table in the catalog, a missing model as one line."""

from __future__ import annotations

import numpy as np
import nibabel as nib
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROOT, cli
from test_models import write_store

# The store of `write_store`: 16 x 18 x 16 voxels of 2 mm, voxel i at -15 + 2i mm (x, z) and -17 + 2i mm (y); AD
# subjects have a darker box at voxels 4:9, 5:10, 4:9. The truth and label images are drawn on a 1 mm grid, so
# they only land there through their affines.
MM1 = np.diag([1.0, 1.0, 1.0, 1.0])
MM1[:3, 3] = [-16, -18, -16]
BOX_1MM = (slice(8, 18), slice(10, 20), slice(8, 18))          # mm -8..1: the planted box, 5 x 5 x 5 store voxels
CORNER_1MM = (slice(22, 28), slice(22, 30), slice(22, 28))     # mm 6..11 x 4..11 x 6..11: 3 x 4 x 3 store voxels
METHODS = ("integrated_gradients", "lrp", "guided_gradcam", "occlusion")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The synthetic store, a truth map and region atlas, and three tiny models trained and registered in MLflow
    as `endopheno train` does its final model (the cross-validation skipped, to keep this quick): cnn3d,
    slice2d (LRP cannot explain it), autoencoder3d (16 latents)."""
    import torch

    from endopheno.models.train import SELECTION, Trainer, TrainReport, load_train_params, model_spec
    from endopheno.tracking import mlflow_run

    root = tmp_path_factory.mktemp("attribute")
    write_store(root / "volumes.zarr", root / "participants.tsv", n=24)
    shape = (32, 36, 32)
    truth = np.zeros(shape, np.float32)
    truth[BOX_1MM] = -0.2                                   # atrophy is negative: scored as |truth| > 0
    nib.save(nib.Nifti1Image(truth, MM1), root / "truth.nii.gz")
    labels = np.zeros(shape, np.int16)
    labels[BOX_1MM], labels[CORNER_1MM] = 1, 2
    nib.save(nib.Nifti1Image(labels, MM1), root / "labels.nii.gz")
    (root / "regions.tsv").write_text("region\tlabel\nbox\t1\ncorner\t2\n")   # the phantom's regions.tsv columns

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    uri = f"sqlite:///{root}/mlflow.db"
    t = params["train"]
    t.update(store=str(root / "volumes.zarr"), participants=str(root / "participants.tsv"), checkpoints=str(root / "models"),
             folds=2, resolution_mm=None, loader_workers=0, threads=1, tracking_uri=uri)
    small = {"epochs": 4, "patience": 4, "batch_size": 8, "learning_rate": 5e-3, "restarts": 0}
    t["models"] = {
        "cnn3d": {"architecture": "cnn3d", "options": {"widths": [4, 8], "kernels": [3, 3], "hidden": 8}, **small},
        "slice2d": {"architecture": "slice2d", "options": {"widths": [4], "hidden": 8}, **small, "epochs": 1},
        "autoencoder3d": {"architecture": "autoencoder3d", "task": "reconstruction",
                          "options": {"latent": 16, "widths": [4, 8]}, **small},
    }
    params["attribute"].update(
        models=["cnn3d", "autoencoder3d"], subjects=6, store=str(root / "volumes.zarr"),
        participants=str(root / "participants.tsv"), out=str(root / "attribution"), device="cpu", ig_steps=32,
        ig_max_steps=256, occlusion_stride=4, randomisation_subjects=4, truth=str(root / "truth.nii.gz"),
        regions={"labels": str(root / "labels.nii.gz"), "table": str(root / "regions.tsv")}, svm_c=[1e-3, 1e-2],
        tracking_uri=uri)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    threads = torch.get_num_threads()
    p = load_train_params(t)
    for name in t["models"]:
        trainer = Trainer(p, model_spec(p, name))
        trainer.checkpoints.mkdir(parents=True)
        metric = SELECTION[trainer.spec.task][0]
        with mlflow_run("endopheno.train", f"train {name}", uri=uri) as run:
            trainer.final(TrainReport(name, trainer.spec.task, [], [], {f"{metric}_mean": 0.0}, run.info.run_id))
    yield root
    torch.set_num_threads(threads)


def attribute(project, *args: str):
    """`endopheno attribute ARGS` in this process (the imports are paid once), its logging set-up undone after."""
    import logging

    from endopheno.cli import app

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        result = CliRunner().invoke(app, ["attribute", "--params", str(project / "params.yaml"), *args],
                                    env={"COLUMNS": "200"})
    finally:
        root.handlers[:], _ = handlers, root.setLevel(level)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def registered(project, name: str):
    import mlflow

    from endopheno.models.extract import load_model

    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    return load_model(name, "1")


@pytest.mark.slow
def test_cnn3d_maps_in_mni_space_checks_and_scores_beside_the_svm_pattern(project):
    import mlflow

    result = attribute(project, "--model", "endopheno.cnn3d@champion")
    out = project / "attribution" / "cnn3d"
    model = registered(project, "endopheno.cnn3d")
    for method in METHODS:
        for group in ("AD", "CN", "all", "correct"):
            img = nib.load(out / f"{method}_{group}.nii.gz")
            assert img.shape == tuple(model.mask.shape)
            assert np.allclose(img.affine, model.affine) and int(img.header["sform_code"]) == 4   # MNI
        assert (out / f"{method}_AD_ortho.png").stat().st_size > 0 and (out / f"{method}_AD_glass.png").exists()
        assert len(list((out / "subjects").glob(f"*_{method}.nii.gz"))) == 6
    assert not [f for f in (project / "attribution").iterdir() if f.name.startswith(".")]   # no staging left
    subjects = pd.read_csv(out / "subjects.tsv", sep="\t")
    assert sorted(subjects.diagnosis) == ["AD"] * 3 + ["CN"] * 3                             # stratified
    scores = pd.read_csv(out / "scores.tsv", sep="\t")
    assert list(scores.method) == [*METHODS, "svm_haufe"]
    assert {"dice_top1", "dice_top5", "dice_top10", "auc", "pearson", "auc_randomised"} <= set(scores.columns)
    assert (scores.truth_voxels == 125).all()              # the 1 mm truth box, resampled through its affine
    assert scores.auc.between(0, 1).all()
    heat = scores[scores.method != "svm_haufe"]
    assert (heat.auc_se > 0).all() and (heat.auc_se < 0.5).all() and pd.isna(scores.auc_se.iloc[-1])
    # the randomisation check's two AUCs, over the same first 4 subjects
    assert heat.auc_randomised.between(0, 1).all() and heat.auc_on_control_subjects.between(0, 1).all()
    assert pd.isna(scores.auc_on_control_subjects.iloc[-1])
    checks = pd.read_csv(out / "checks.tsv", sep="\t").set_index("method")
    assert list(checks.status) == ["ok"] * 4
    assert checks.completeness_max["integrated_gradients"] < 0.05
    assert checks.randomisation_rank_correlation.notna().any()
    assert "svm_haufe" in result.stdout and "attribute endopheno.cnn3d/1: 4 method(s) on 6 subjects" in result.stderr
    run = mlflow.search_runs(experiment_names=["endopheno.attribution"], output_format="list",
                             filter_string="tags.model_name = 'endopheno.cnn3d'")[0]
    assert run.data.tags["model_version"] == "1" and "integrated_gradients_auc" in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "attribution")}
    assert {"attribution/scores.tsv", "attribution/lrp_AD.nii.gz", "attribution/lrp_AD_glass.png"} <= artifacts
    version = mlflow.MlflowClient().get_model_version("endopheno.cnn3d", "1")
    assert version.tags["attribution_run"] == run.info.run_id

    from endopheno.featurestore.catalog import CatalogParams, build_catalog, connect, query

    build_catalog(CatalogParams(path="catalog_scores.duckdb", features="features", participants="participants.tsv",
                                imaging_qc=None, genotypes=None, gwas=None, attribution="attribution",
                                tracking_uri=f"sqlite:///{project}/mlflow.db"), project)
    scores = query(connect(project / "catalog_scores.duckdb"), "SELECT model, method FROM attribution.scores").to_pandas()
    assert set(scores[scores.model == "cnn3d"].method) == {*METHODS, "svm_haufe"}


@pytest.mark.slow
def test_a_method_that_cannot_explain_the_model_is_skipped_and_reported(project):
    result = attribute(project, "--model", "endopheno.slice2d@champion", "--methods", "lrp,guided_gradcam",
                       "--subjects", "4")
    assert "skipped lrp on endopheno.slice2d/1: it pools the slice embeddings" in result.stderr
    out = project / "attribution" / "slice2d"
    assert list(pd.read_csv(out / "scores.tsv", sep="\t").method) == ["guided_gradcam", "svm_haufe"]
    checks = pd.read_csv(out / "checks.tsv", sep="\t").set_index("method")
    assert checks.status.to_dict() == {"lrp": "skipped", "guided_gradcam": "ok"} and "outside any module" in checks.reason["lrp"]
    assert not list(out.glob("lrp_*")) and (out / "guided_gradcam_AD.nii.gz").exists()


@pytest.mark.slow
def test_autoencoder_latent_regions_sum_to_one_and_the_catalog_shows_them(project):
    from endopheno.featurestore.catalog import CatalogParams, build_catalog, connect, query

    result = attribute(project, "--model", "endopheno.autoencoder3d@champion")
    assert f"skipped {', '.join(METHODS)} on endopheno.autoencoder3d/1: its output is a reconstruction" in result.stderr
    table = pd.read_parquet(project / "attribution" / "autoencoder3d" / "latent_regions.parquet")
    assert sorted(table.dimension.unique()) == [f"f{d:03d}" for d in range(16)]        # the ae_t1 column names
    assert np.allclose(table.groupby("dimension").share.sum(), 1.0)
    assert set(table.region) == {"box", "corner", "background"}
    voxels = table.drop_duplicates("region").set_index("region").voxels
    assert voxels["box"] == 125 and voxels["corner"] == 36          # the 1 mm atlas on the model grid (nearest)
    assert (table.groupby("dimension")["rank"].apply(sorted).map(list) == [[1, 2, 3]] * 16).all()
    assert set(table.model_name) == {"endopheno.autoencoder3d"} and set(table.model_version) == {"1"}

    build_catalog(CatalogParams(path="catalog.duckdb", features="features", participants="participants.tsv",
                                imaging_qc=None, genotypes=None, gwas=None, attribution="attribution",
                                tracking_uri=f"sqlite:///{project}/mlflow.db"), project)
    con = connect(project / "catalog.duckdb")
    top = query(con, "SELECT dimension, region, share FROM attribution.latent_regions "
                     "WHERE rank = 1 ORDER BY dimension").to_pandas()
    assert len(top) == 16
    best = table[table["rank"] == 1].sort_values("dimension")
    assert top.region.tolist() == best.region.tolist() and np.allclose(top.share, best.share)


@pytest.mark.slow
def test_a_missing_model_is_one_clear_line(project):
    out = cli("attribute", "--model", "endopheno.nothing@champion", "--params", "params.yaml", cwd=project, check=2)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "endopheno.nothing@champion: not in the model registry" in lines[0], out.stderr


# ---- the pieces, by hand ------------------------------------------------------------------------------

def test_region_shares_by_hand():
    from endopheno.attribution.regions import region_shares, top_regions
    from endopheno.featurestore.atlas import Atlas

    labels = np.zeros((4, 4, 4), np.int16)
    labels[0], labels[1] = 1, 2
    mask = np.ones((4, 4, 4), bool)
    mask[3] = False                                        # 48 brain voxels: a 16, b 16, background 16
    change = np.zeros((2, 4, 4, 4))
    change[0, 0], change[0, 2], change[0, 3] = 1.0, 3.0, 5.0   # x = 3 lies outside the mask: not counted
    table = region_shares(change, Atlas(labels, ("a", "b"), "hand"), mask, ["f000", "f001"]).set_index(["dimension", "region"])
    assert table.loc[("f000", "a"), "share"] == pytest.approx(0.25)
    assert table.loc[("f000", "background"), "share"] == pytest.approx(0.75)
    assert table.loc[("f000", "b"), "share"] == 0.0
    assert [table.loc[("f000", r), "rank"] for r in ("background", "a", "b")] == [1, 2, 3]
    assert table.loc[("f000", "a"), "enrichment"] == pytest.approx(0.25 / (16 / 48))
    assert table.loc["f001", "share"].isna().all()                 # a dimension that changes nothing
    top = top_regions(table.reset_index(), 1)
    assert top.set_index("dimension").top_region.to_dict() == {"f000": "a"}


def test_subjects_chosen_deterministically_and_stratified():
    from endopheno.attribution.run import choose_subjects

    subjects = np.array([f"s{i:03d}" for i in range(30)])
    diagnosis = np.array(["AD"] * 10 + ["CN"] * 20)
    chosen = choose_subjects(subjects, diagnosis, 9, seed=1)
    assert list(chosen) == list(choose_subjects(subjects, diagnosis, 9, seed=1))
    assert (diagnosis[chosen] == "AD").sum() == 3                  # a third of the cohort, a third of the choice
    assert (diagnosis[chosen[:3]] == "AD").sum() == 1              # every prefix is stratified
    assert set(chosen) != set(choose_subjects(subjects, diagnosis, 9, seed=2))
