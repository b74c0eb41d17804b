"""The command line: user mistakes give one line and exit status 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

from conftest import cli


def test_help_lists_commands():
    out = cli("--help", check=0).stdout
    for command in ("phantom", "ingest", "preprocess"):
        assert command in out


def test_user_errors_are_one_line(tmp_path):
    cases = [
        (["ingest", "--store", str(tmp_path / "v.zarr")], "give exactly one of --bids DIR or --manifest FILE.csv"),
        (["ingest", "--store", str(tmp_path / "v.zarr"), "--bids", str(tmp_path / "nope")], "not a directory"),
        (["ingest", "--store", str(tmp_path / "v.zarr"), "--manifest", str(tmp_path / "nope.csv")], "no such manifest"),
        (["preprocess", "--store", str(tmp_path / "empty.zarr")], "not a volume store"),
        (["phantom", "--out", str(tmp_path / "p"), "--subjects", "1"], "at least 2 subjects"),
        (["ingest", "--store", __file__, "--manifest", str(tmp_path / "one.csv")], "a file, not a volume store"),
        (["sql", "SELECT 1", "--format", "csv", "--out", str(tmp_path / "no" / "x.csv")], "its folder does not exist"),
    ]
    params = str(Path(__file__).parents[1] / "params.yaml")
    cases += [
        (["train", "nosuch", "--epochs", "1", "--params", params], "nosuch: no such model"),
        (["train", "cnn3d", "--folds", "1", "--params", params], "folds 1: cross-validation needs at least 2"),
    ]
    (tmp_path / "cols.csv").write_text("subject,file\na,b\n")
    (tmp_path / "one.csv").write_text("subject_id,path\na,a.nii.gz\n")
    cases.append((["ingest", "--store", str(tmp_path / "v.zarr"), "--manifest", str(tmp_path / "cols.csv")], "missing column(s) path, subject_id"))
    for args, words in cases:
        proc = cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in proc.stderr, (args, proc.stderr)


def test_a_parameter_file_that_is_wrong_is_one_line(tmp_path):
    """A --params file that does not parse, or whose sections are not mappings, is one line and exit
    status 2, not a traceback."""
    (tmp_path / "broken.yaml").write_text("report: [1\n")
    (tmp_path / "list.yaml").write_text("report: [a]\ncatalog: 3\n")
    (tmp_path / "top.yaml").write_text("- report\n")
    cases = [
        (["report", "--params", str(tmp_path / "broken.yaml")], "not valid YAML"),
        (["report", "--params", str(tmp_path / "list.yaml")], "section 'report' must map parameter names to values"),
        (["catalog", "--params", str(tmp_path / "list.yaml")], "section 'catalog' must map"),
        (["report", "--params", str(tmp_path / "top.yaml")], "not a parameter file"),
    ]
    for args, words in cases:
        proc = cli(*args, cwd=tmp_path)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], (args, proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.yaml", "list.yaml", "top.yaml"]


def test_a_gwas_block_of_no_variants_is_one_line(tmp_path):
    from endopheno.gwas.simulate import write_study

    study = write_study(tmp_path / "study", samples=40, variants=20, phenotypes=1, causal={}, seed=1)
    proc = cli("gwas", "--bfile", str(study), "--pheno", str(tmp_path / "study" / "pheno.tsv"), "--out", str(tmp_path / "g"),
               "--block-variants", "0", "--no-mlflow", "--workers", "1")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and lines == ["error: gwas: block_variants must be at least 1, not 0"], proc.stderr


def test_the_registry_of_a_tracking_store_that_is_not_there_is_an_error(tmp_path):
    """`endopheno models` only reads: a mistyped store is one line and exit 2, not an empty registry in a
    new, empty store at that path."""
    db = tmp_path / "no" / "mlflow.db"
    proc = cli("models", "--tracking-uri", f"sqlite:///{db}")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "no MLflow tracking store here" in lines[0], proc.stderr
    assert not (tmp_path / "no").exists()
