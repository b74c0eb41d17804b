"""The DVC pipeline on a fresh clone with a tiny cohort: `dvc repro` builds every output (models
trained and registered, feature sets extracted, attribution, the catalog showing them, a GWAS per
feature set, the validation metrics and the report), every SQL query of the README runs on its catalog,
a second `dvc repro` does nothing, and an experiment changing one GWAS parameter reruns only the GWAS
and what follows it."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import xarray as xr

from conftest import ROOT, small_params


def readme_sql(readme: str) -> list[list[str]]:
    """The README's `endopheno sql` command lines, and each statement of its ```sql blocks as one."""
    commands = [shlex.split(line, comments=True) for line in re.findall(r"^endopheno sql .*$", readme, re.M)]
    for block in re.findall(r"^```sql\n(.*?)^```", readme, re.S | re.M):
        code = "\n".join(line for line in block.splitlines() if not line.lstrip().startswith("--"))
        commands += [["endopheno", "sql", statement.strip()] for statement in code.split(";") if statement.strip()]
    return commands


@pytest.mark.slow
def test_dvc_repro_on_a_fresh_clone(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    # Uncommitted work is part of what is tested: copy the working tree's tracked files over the clone.
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (clone / f).parent.mkdir(parents=True, exist_ok=True)
            (clone / f).write_bytes(src.read_bytes())
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["phantom"] = {**small_params(16), "out": "data/phantom", "workers": 1}
    params["ingest"]["workers"] = params["preprocess"]["workers"] = 1
    # tiny models on an 8 mm grid, 2 folds: the stages run, not the science
    params["train"].update(folds=2, resolution_mm=8.0, loader_workers=0, threads=1)
    tiny = {"epochs": 2, "patience": 2, "batch_size": 4}
    params["train"]["models"]["cnn3d"].update(options={"widths": [4, 8], "kernels": [3, 3], "hidden": 8}, **tiny)
    # the default parcel bottleneck, narrow
    params["train"]["models"]["autoencoder3d"].update(options={**params["train"]["models"]["autoencoder3d"]["options"],
                                                               "widths": [4]}, **tiny)
    params["extract"]["loader_workers"] = 0
    params["attribute"].update(subjects=4, randomisation_subjects=2, batch_size=4, ig_steps=8, ig_max_steps=16,
                               subject_maps=False)
    # 16 samples: few PCs and covariates, so each regression keeps residual degrees of freedom
    params["genotypes"]["pca"]["pcs"] = 2
    params["catalog"]["covariates"] = ["age", "sex", "etiv_mm3"]
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run = subprocess.run(["dvc", "repro"], cwd=clone, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    ds = xr.open_zarr(clone / "stores" / "volumes.zarr", group="mni")
    assert ds["T1w"].shape[0] == 16 and ds["qc_pass"].values.all()
    assert (clone / "stores" / "qc" / "montage.png").exists()
    assert (clone / "data" / "phantom" / "genotypes" / "phantom.bed").exists()
    metrics = subprocess.run(["dvc", "metrics", "show"], cwd=clone, env=env, capture_output=True, text=True).stdout
    assert "stores/models/cnn3d/metrics.json" in metrics and "balanced_accuracy_mean" in metrics
    import duckdb

    con = duckdb.connect(str(clone / "stores" / "catalog.duckdb"), read_only=True)
    os.chdir(clone)   # the catalog's views hold paths relative to the repository root
    try:
        for name, model in (("ae_t1", "endopheno.autoencoder3d"), ("ae_t1_random", "endopheno.autoencoder3d_untrained"),
                            ("cnn3d_t1", "endopheno.cnn3d")):
            rows, models = con.sql(f"SELECT count(*), any_value(model_name) FROM features.{name}").fetchall()[0]
            assert rows == 16 and models == model
        assert con.sql("SELECT count(*) FROM features.ae_t1 WHERE f127 IS NOT NULL").fetchall()[0][0] == 16
        # The catalog shows the results of the stages before it: every GWAS, with its lineage.
        runs = {r[0] for r in con.sql("SELECT DISTINCT run FROM gwas.results").fetchall()}
        assert runs == {"atlas_regions", "ae_t1", "cnn3d_t1", "ae_t1_random"}, runs
        assert con.sql("SELECT count(*) FROM meta.lineage WHERE gwas_run_id IS NOT NULL AND feature_set_version IS NOT NULL"
                       ).fetchall()[0][0] == 4
    finally:
        os.chdir(ROOT)
    con.close()
    # What the README tells a new user to type must work on what `dvc repro` built.
    queries = readme_sql((clone / "README.md").read_text())
    assert len(queries) >= 8
    for argv in queries:
        done = subprocess.run(argv, cwd=clone, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"README: {shlex.join(argv)}\n{done.stdout}{done.stderr}"
    validation = json.loads((clone / "stores" / "validation" / "validation.json").read_text())
    assert set(validation["feature_sets"]) == {"atlas_regions", "ae_t1", "cnn3d_t1", "ae_t1_random"}
    assert all(s["planted"] == 2 for s in validation["feature_sets"].values())
    assert "stores/validation/metrics.json" in metrics
    report = json.loads((clone / "stores" / "report" / "report.json").read_text())
    assert report["sections"]["validation"]["status"] == "present" and report["figures"]
    assert (clone / "stores" / "attribution" / "cnn3d" / "scores.tsv").exists()

    again = subprocess.run(["dvc", "repro"], cwd=clone, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "didn't change" in again.stdout + again.stderr and "Running stage" not in again.stdout
    status = subprocess.run(["dvc", "status"], cwd=clone, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout

    # The user's next step: commit the run (its dvc.lock), then try a variant as an experiment.
    subprocess.run(["git", "add", "-A"], cwd=clone, check=True)
    subprocess.run(["git", "-c", "user.name=endopheno tests", "-c", "user.email=tests@endopheno.invalid", "commit", "-qm",
                    "the tiny cohort's run"], cwd=clone, check=True)
    # One GWAS knob: the four scans, the catalog that shows them, validation and report rerun; nothing upstream does.
    exp = subprocess.run(["dvc", "exp", "run", "-S", "gwas.transform=inverse_normal"], cwd=clone, env=env,
                         capture_output=True, text=True)
    assert exp.returncode == 0, exp.stdout + exp.stderr
    ran = set(re.findall(r"Running stage '([^']+)'", exp.stdout))
    assert ran == {"gwas@atlas_regions", "gwas@ae_t1", "gwas@cnn3d_t1", "gwas@ae_t1_random", "catalog", "validate",
                   "report"}, ran
    shown = subprocess.run(["dvc", "exp", "show", "--csv"], cwd=clone, env=env, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    # The experiment's row carries its own metrics (not a metric file missing from its commit), beside main's.
    rows = {r["Experiment"] or r["rev"]: r for r in csv.DictReader(io.StringIO(shown.stdout))}
    experiment = next(r for name, r in rows.items() if name not in ("workspace", "main"))
    assert experiment["gwas.transform"] == "inverse_normal" and rows["main"]["gwas.transform"] == "none"
    for row in (experiment, rows["main"]):
        assert row["atlas_regions.found"] not in ("", "!") and row["balanced_accuracy_mean"] not in ("", "!"), row


def test_a_pipeline_run_from_a_clean_commit_is_not_called_dirty(tmp_path):
    """`dvc repro` rewrites dvc.lock after each stage: that alone must not mark the code as changed,
    while an edited tracked file, anywhere in the tree, must."""
    from endopheno.tracking import git_revision

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "sub").mkdir()
    for name in ("dvc.lock", "params.yaml", "sub/dvc.lock"):
        (tmp_path / name).write_text("a\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    clean = git_revision(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{40}", clean)
    (tmp_path / "dvc.lock").write_text("b\n")
    (tmp_path / "sub" / "dvc.lock").write_text("b\n")
    assert git_revision(tmp_path) == clean and git_revision(tmp_path / "sub") == clean
    (tmp_path / "params.yaml").write_text("b\n")
    assert git_revision(tmp_path) == clean + "-dirty" and git_revision(tmp_path / "sub") == clean + "-dirty"


def _dvc_index(tmp_path: Path) -> dict[str, dict]:
    """dvc.yaml and params.yaml as DVC itself reads them (foreach, ${...} and all), in a copy: per stage,
    the params it tracks (dotted key -> value) and the paths it depends on."""
    import shutil

    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    root = tmp_path / "dvc"
    if not (root / ".dvc").exists():
        root.mkdir()
        Repo.init(str(root), no_scm=True).close()
        for name in ("dvc.yaml", "params.yaml"):
            shutil.copyfile(ROOT / name, root / name)
    with Repo(str(root)) as repo:
        return {s.name: {"params": {k: v for d in s.deps if isinstance(d, ParamsDependency) for k, v in d.read_params().items()},
                         "deps": [d.def_path for d in s.deps if not isinstance(d, ParamsDependency)]}
                for s in repo.index.stages}


def test_adding_a_model_or_a_feature_set_reruns_none_of_the_stages_already_there(tmp_path):
    """The foreach lists (train.pipeline, extract.sets, attribute.models, gwas.feature_sets) are not params
    of the stages they expand to: adding an entry adds a stage and leaves the others' params as they were.
    And each of those stages still tracks every other knob of its section."""
    before = _dvc_index(tmp_path)
    params = yaml.safe_load((tmp_path / "dvc" / "params.yaml").read_text())
    params["train"]["pipeline"].append("slice2d")
    params["extract"]["sets"]["slice2d_t1"] = "slice2d"
    params["attribute"]["models"].append("slice2d")
    params["gwas"]["feature_sets"].append("slice2d_t1")
    (tmp_path / "dvc" / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    after = _dvc_index(tmp_path)
    assert set(after) - set(before) == {"train@slice2d", "extract@slice2d_t1", "attribute@slice2d", "gwas@slice2d_t1"}
    changed = sorted(s for s in before if before[s]["params"] != after[s]["params"])
    assert not changed, f"these stages would rerun: {changed}"
    for stage, section, listing in (("gwas@atlas_regions", "gwas", "feature_sets"), ("attribute@cnn3d", "attribute", "models")):
        tracked = {k.removeprefix(section + ".") for k in after[stage]["params"] if k.startswith(section + ".")}
        assert tracked == set(params[section]) - {listing}, (stage, set(params[section]) - {listing} ^ tracked)


# Modules of endopheno a stage's command imports that are not its dependencies in dvc.yaml, and why.
NOT_DEPENDENCIES = {
    "errors.py": "the messages of user errors",
    "params.py": "reads params.yaml: the values are the stages' params",
    "parallel.py": "spreads work over processes or threads; the numbers do not depend on it",
    "tracking.py": "MLflow bookkeeping",
}
# Read through the MNI volume store: ${preprocess.digest} stands for them (listing the preprocessing code
# would retrain the models on every edit of it).
MNI_READERS = {"volumes/preprocess.py": "open_mni, split_row_label", "volumes/store.py": "the group's layout",
               "mni.py": "the template"}
# train@MODEL lists them, and its metrics.json, a dependency of these stages, changes whenever it reruns.
TRAINED = {f"models/{m}.py": "train@MODEL" for m in ("architectures", "basis", "data", "splits", "train", "volume_model")}
NOT_DEPENDENCIES_OF = {
    "extract_atlas": MNI_READERS,
    "train": {**MNI_READERS, "featurestore/atlas.py": "soft_grey_matter, for a `gm` input no model of train.pipeline reads"},
    "extract": {**MNI_READERS, **TRAINED, "featurestore/atlas.py": "BuildReport, the summary line"},
    "attribute": {**{k: v for k, v in MNI_READERS.items() if k != "mni.py"}, **TRAINED,
                  # imported by models/extract.py and featurestore/atlas.py to write feature sets, which it does not
                  "featurestore/definitions.py": "writing feature sets", "featurestore/store.py": "writing feature sets"},
    "catalog": MNI_READERS,
    "gwas": MNI_READERS,
    "validate": {"gwas/linear.py": "imported by gwas/results.py for the scan", "genotypes/qc.py": "the same"},
}


def _imports(tree, module: str, package: bool) -> set[str]:
    """The endopheno modules a syntax tree imports, at any depth (the commands import lazily)."""
    import ast

    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = module.split(".")[:len(module.split(".")) - node.level + package] if node.level else []
            name = ".".join([*base, *([node.module] if node.module else [])])
            found |= {name} | {f"{name}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] == "endopheno"}


def _source(module: str) -> Path | None:
    path = ROOT / "src" / Path(*module.split("."))
    return next((p for p in (path / "__init__.py", path.with_suffix(".py")) if p.exists()), None)


def _command_modules(script: Path, exempt: set[str]) -> set[str]:
    """The files under src/endopheno that a stage script's `endopheno` command reads its code from: the
    command's function in cli.py (with the helpers it calls) and, transitively, what they import."""
    import ast

    import endopheno.cli as cli

    call = next(n for n in ast.walk(ast.parse(script.read_text()))
                if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "run")
    first = call.args[0]
    words = (first.value if isinstance(first, ast.Constant) else first.values[0].value).split()
    commands = {(c.name or c.callback.__name__.replace("_", "-")): c.callback for c in cli.app.registered_commands}
    callback = commands.get(words[0])
    if callback is None:
        group = next(g for g in cli.app.registered_groups if g.name == words[0]).typer_instance
        callback = next(c.callback for c in group.registered_commands if c.name == words[1])
    functions = {n.name: n for n in ast.parse(Path(cli.__file__).read_text()).body if isinstance(n, ast.FunctionDef)}
    todo, seen_functions, modules = [callback.__name__], set(), set()
    while todo:
        f = functions[todo.pop()]
        seen_functions.add(f.name)
        modules |= _imports(f, "endopheno.cli", False)
        # the module's helpers (_catalog_params, ...) it calls; a command calls no other command
        todo += [n.func.id for n in ast.walk(f) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                 and n.func.id.startswith("_") and n.func.id in functions and n.func.id not in seen_functions]
    files, todo = set(), list(modules)
    while todo:
        module = todo.pop()
        path = _source(module)
        if path is None or path in files:
            continue
        rel = path.relative_to(ROOT / "src" / "endopheno").as_posix()
        if rel in exempt:
            continue
        files.add(path)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += _imports(ast.parse(path.read_text()), module, path.name == "__init__.py")
    return {p.relative_to(ROOT).as_posix() for p in files if p.name != "__init__.py" or p.read_text().count("import ") > 1}


def test_every_stage_depends_on_the_code_its_command_runs(tmp_path):
    """Editing a module that a stage's command imports reruns the stage: each is a dependency in dvc.yaml
    (itself or its folder), or is named above with the reason it need not be."""
    lacking = {}
    for stage, s in _dvc_index(tmp_path).items():
        name = stage.split("@")[0]
        exempt = {**NOT_DEPENDENCIES, **NOT_DEPENDENCIES_OF.get(name, {})}
        used = _command_modules(ROOT / "pipelines" / f"{name}.py", set(exempt))
        missing = sorted(f for f in used if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in s["deps"]))
        if missing:
            lacking[stage] = missing
    assert not lacking, lacking


def test_a_stage_script_refuses_a_wrong_params_yaml_in_one_line(tmp_path):
    """A mistake in params.yaml that a stage script meets before the command runs (a missing section, an
    unknown genotype format) is one line and exit status 2, as the command's own."""
    (tmp_path / "params.yaml").write_text("genotypes: {format: vcf, source: x, store: y}\ndask: {scheduler: null}\n")
    for script, words in (("genotypes", "genotypes.format is 'vcf'"), ("gwas", "has no section 'gwas'")):
        proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / f"{script}.py"), "atlas_regions"], cwd=tmp_path,
                              capture_output=True, text=True, env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], (script, proc.returncode, proc.stderr)
