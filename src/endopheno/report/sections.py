"""The report's sections, each read from the files one stage writes. A section whose input is not there
says what is missing and which command writes it, and the report goes on: a report made before the
later stages have run shows what exists."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from endopheno.attribution.score import below_randomised
from endopheno.report.html import Figures, Section, collapsed, figures, paragraph, table

REGISTRY_PREFIX = "endopheno."      # registered models are endopheno.NAME; their attribution folder is NAME


def participants_table(participants: pd.DataFrame) -> pd.DataFrame:
    """Participants by diagnosis (a row each, then ``all``): count, each sex, age mean ± SD (n − 1), each
    site; a column the participants table lacks is left out."""
    groups = list(participants.groupby("diagnosis", sort=True)) if "diagnosis" in participants else []
    sexes = sorted(participants["sex"].dropna().unique()) if "sex" in participants else []
    sites = sorted(participants["site"].dropna().unique()) if "site" in participants else []
    rows = []
    for label, g in [*groups, ("all", participants)]:
        row = {"diagnosis": label, "subjects": len(g), **{f"sex {s}": int((g["sex"] == s).sum()) for s in sexes}}
        if "age" in g:
            row["age (mean ± SD)"] = f"{g['age'].mean():.1f} ± {g['age'].std():.1f}"
        rows.append({**row, **{str(s): int((g["site"] == s).sum()) for s in sites}})
    return pd.DataFrame(rows)


def cohort(participants: Path, qc: Path, scans: dict[str, dict]) -> Section:
    """Who is in the cohort, how many pass imaging QC, and how many genotyped samples each GWAS tested
    (`scans`: feature set → its scan.json)."""
    s = Section("cohort", "Cohort")
    if participants.exists():
        s.add(table(participants_table(pd.read_csv(participants, sep="\t"))))
        s.add(paragraph(f"From {participants}."))
    else:
        s.lack(f"The participants table {participants}",
               "`endopheno phantom` (DVC stage phantom; for a real cohort, the BIDS dataset's participants.tsv)")
    if qc.exists():
        q = pd.read_csv(qc, sep="\t")
        s.add(paragraph(f"Imaging QC: {int(q['qc_pass'].sum())} of {len(q)} preprocessed subjects pass "
                        "(correlation of the registered volume with the MNI template)."))
    else:
        s.lack(f"The imaging QC table {qc}", "`endopheno preprocess` (DVC stage preprocess)")
    if scans:
        counts = "; ".join(f"{name}: {max(scan['samples'].values(), default=0)}" for name, scan in scans.items())
        s.add(paragraph(f"Genotyped samples with phenotypes in each association study: {counts}."))
    return s


def qc_montage(qc_dir: Path, figs: Figures) -> Section:
    s = Section("qc", "Imaging QC")
    montage, qc = qc_dir / "montage.png", qc_dir / "qc.tsv"
    if not montage.exists():
        s.lack(f"The QC montage {montage}", "`endopheno preprocess` (DVC stage preprocess)")
        return s
    s.add(figs.figure(montage, "qc_montage.png", "Mid slices of preprocessed volumes in MNI space, the lowest QC "
                                                 "correlations first, with the template's brain outline in red"))
    if qc.exists():
        flagged = pd.read_csv(qc, sep="\t").query("not qc_pass")
        s.add(paragraph("Flagged: " + ", ".join(f"{r.subject} ({r.qc_correlation:.3f})" for r in flagged.itertuples())
                        if len(flagged) else "No subject is flagged."))
    return s


def metrics_table(metrics: dict) -> pd.DataFrame:
    """The cross-validated metrics of `endopheno train --metrics` as rows: the model's mean ± SD over the
    folds beside the baseline's (keys ``X_mean``, ``X_sd``, ``baseline_X_mean``, ``baseline_X_sd``)."""
    def spread(prefix: str, name: str) -> str:
        mean, sd = metrics.get(f"{prefix}{name}_mean"), metrics.get(f"{prefix}{name}_sd")
        return "–" if mean is None else f"{mean:.3f} ± {sd:.3f}"

    names = [k.removesuffix("_mean") for k in metrics if k.endswith("_mean") and not k.startswith("baseline_")]
    return pd.DataFrame({"metric": names, "model (mean ± SD over folds)": [spread("", n) for n in names],
                         "baseline": [spread("baseline_", n) for n in names]})


def models(models_dir: Path, names: tuple[str, ...]) -> tuple[Section, dict[str, dict]]:
    """Per model, its fold metrics beside the baseline's; returns the section and each model's metrics."""
    s = Section("models", "Models")
    found = {}
    s.explain("Baselines, scored on the same test folds: a linear SVM on the voxels (classifiers), a linear SVR "
              "(regression), the untrained network (autoencoder).")
    for name in names:
        s.heading(name)
        path = models_dir / name / "metrics.json"
        if not path.exists():
            s.lack(f"The metrics file of {name} ({path})", f"`endopheno train {name} --metrics {path}` (DVC stage train@{name})")
            continue
        m = found[name] = json.loads(path.read_text())
        s.add(paragraph(f"Registered as {m.get('model')} version {m.get('version')}"
                        + (" (alias champion)" if m.get("champion") else "") + f"; MLflow run {m.get('mlflow_run_id')}."))
        s.add(table(metrics_table(m)))
    return s, found


def attribution_table(checks: pd.DataFrame | None, scores: pd.DataFrame | None) -> pd.DataFrame | None:
    """Method × metric: the checks of each method that ran (IG completeness, randomisation ρ) beside its
    scores against the truth map; the SVM pattern's row (scores only) last, as scores.tsv has it."""
    ok = None if checks is None else checks[checks["status"] == "ok"].drop(columns=["status", "reason", "seconds"],
                                                                         errors="ignore")
    if scores is None:
        return ok
    scores = scores.drop(columns=["group", "truth_voxels"])
    return scores if ok is None else scores.merge(ok, on="method", how="left")


def attribution(folder: Path, names: tuple[str, ...], figs: Figures) -> Section:
    """Per model: the method × metric table, each method's group-map figures, and for an autoencoder the
    latent-to-region table."""
    s = Section("attribution", "Attribution")
    for name in names:
        s.heading(name)
        out = folder / name
        tables = {f: pd.read_csv(out / f"{f}.tsv", sep="\t") if (out / f"{f}.tsv").exists() else None
                  for f in ("checks", "scores", "top_regions")}
        if all(t is None for t in tables.values()):
            s.lack(f"The attribution of {name} ({out})", f"`endopheno attribute --model {name}` (DVC stage attribute@{name})")
            continue
        checks, scores = tables["checks"], tables["scores"]
        if scores is not None:
            s.explain(f"Scores of the {scores['group'].iloc[0]} group's map against the truth map "
                      f"({scores['truth_voxels'].iloc[0]} voxels); the randomisation ρ compares the model's maps with "
                      "a re-initialised copy's (low is good).")
        frame = attribution_table(checks, scores)
        if frame is not None and len(frame):
            s.add(table(frame))
        if scores is not None:
            for sentence in below_randomised(scores):
                s.add(paragraph(f"Sanity check failed, {sentence}."))
        if checks is not None:
            for reason, skipped in checks[checks["status"] == "skipped"].groupby("reason", sort=False)["method"]:
                s.add(paragraph(f"Skipped {', '.join(skipped)}: {reason}."))
        order = list(scores["method"]) if scores is not None else []
        maps = sorted(out.glob("*_ortho.png"), key=lambda f: (_method(f, order), f.name))
        if maps:
            s.add(figures([figs.figure(f, f"attribution/{name}/{f.name}", f"{name}: {f.stem}") for ortho in maps
                           for f in (ortho, ortho.with_name(ortho.name.replace("_ortho", "_glass"))) if f.exists()]))
        if tables["top_regions"] is not None:
            s.add(collapsed(f"Latent dimension → top regions ({len(tables['top_regions'])} dimensions)",
                            table(tables["top_regions"])))
    return s


def _method(figure: Path, order: list[str]) -> int:
    return next((i for i, m in enumerate(order) if figure.name.startswith(m + "_")), len(order))


def loci_table(loci: pd.DataFrame, leads: pd.DataFrame, regions: dict[str, str] | None) -> pd.DataFrame:
    """Independent loci, strongest first, with the lead variant's effect from its full model
    (leads.parquet: the term named after the variant) and, for a latent feature set, what the dimension is."""
    # variants are told apart by their row (IDs may repeat); results written before that know only the ID
    key = ["phenotype", "lead_variant" if "lead_variant" in loci and "lead_variant" in leads else "lead_id"]
    effect = leads[leads["term"] == leads["lead_id"]][[*key, "coef", "se", "n"]]
    t = loci.merge(effect, on=key, how="left").sort_values("p", kind="stable")
    out = pd.DataFrame({
        "phenotype": t["phenotype"], "lead variant": t["lead_id"], "chrom": t["chrom"], "position": t["lead_pos"],
        "p": t["p"].map("{:.2e}".format), "β (SE)": [f"{b:.3f} ({se:.3f})" for b, se in zip(t["coef"], t["se"])],
        "n": t["n"].astype("Int64"), "variants": t["variants"], "span (kb)": (t["end"] - t["start"]) / 1000,
        "study-wide": t["study_wide"].map({True: "yes", False: "no"})})
    if regions is not None:
        out.insert(1, "regions (share of the decoded change, enrichment)", t["phenotype"].map(regions).fillna("–"))
    return out


def latent_regions(attribution: Path, origin: dict, models: tuple[str, ...]) -> tuple[dict[str, str] | None, str]:
    """What each latent dimension of the model behind a feature-set version changes (top_regions.tsv of its
    attribution) — or None, and the map that is missing. The map must be of the very model version that
    made the features. Features not made by a registered model (the atlas set), by a model the report
    does not cover (`models`: the untrained baseline) or by one whose attribution has no map (a
    classifier) have none to miss."""
    model, version = origin.get("model_name"), origin.get("model_version")
    if not model or not model.startswith(REGISTRY_PREFIX):
        return None, ""
    folder = attribution / model.removeprefix(REGISTRY_PREFIX)
    wanted = f"The latent-to-region map of {model} v{version} ({folder}"
    if not folder.exists():
        return None, wanted + ")" if folder.name in models else ""
    if not (folder / "latent_regions.parquet").exists():
        return None, ""
    mapped = pd.read_parquet(folder / "latent_regions.parquet", columns=["model_version"])["model_version"].iloc[0]
    if str(mapped) != str(version):
        return None, wanted + f" holds v{mapped}'s)"
    top = pd.read_csv(folder / "top_regions.tsv", sep="\t")
    return dict(zip(top["dimension"], top["regions"])), ""


def association(gwas: Path, names: tuple[str, ...], attribution_dir: Path, models: tuple[str, ...],
                origins: dict[str, dict], figs: Figures) -> Section:
    """Per feature set: λGC, Manhattan and QQ plots, the independent loci with their lead variants and, for
    an autoencoder's latent set, the region each hit dimension maps to."""
    s = Section("association", "Association studies")
    for name in names:
        s.heading(name)
        folder = gwas / name
        if not (folder / "summary.json").exists():
            s.lack(f"The GWAS of {name} ({folder / 'summary.json'})",
                   f"`endopheno gwas --feature-set {name} --out {folder}` (DVC stage gwas@{name})")
            continue
        summary = json.loads((folder / "summary.json").read_text())
        lam, t = summary.get("lambda_gc_median"), summary["thresholds"]
        s.add(paragraph(f"{len(summary['phenotypes'])} phenotypes, λGC median " + ("–" if lam is None else f"{lam:.3f}")
                        + f"; {summary['hits_genome_wide']} genome-wide hits (p < {t['genome-wide']:.1e}) in "
                        f"{summary['loci']} loci, {summary['loci_study_wide']} below the study-wide threshold "
                        f"{t['study-wide']:.2e}."))
        plots = [(folder / "plots" / f, f"{name}: {caption}") for f, caption in
                 (("manhattan_all.png", "Manhattan plot, strongest phenotype per variant"), ("qq.png", "QQ plot"))]
        for f, caption in plots:
            if f.exists():
                s.add(figs.figure(f, f"gwas/{name}/{f.name}", caption))
        regions, lacking = latent_regions(attribution_dir, origins.get(name, {}), models)
        if lacking:
            origin = origins[name]
            s.lack(lacking, f"`endopheno attribute --model {origin['model_name']}/{origin['model_version']}`")
        loci = pd.read_parquet(folder / "loci.parquet")
        if len(loci):
            s.add(table(loci_table(loci, pd.read_parquet(folder / "leads.parquet"), regions)))
        else:
            s.add(paragraph("No locus reaches the genome-wide threshold."))
    return s


def validation(folder: Path) -> Section:
    """The whole chain against the phantom's truth: planted loci found, false loci and λGC per feature set,
    the targets, and every planted or false locus."""
    s = Section("validation", "Validation against the phantom's truth")
    path, loci = folder / "validation.json", folder / "loci.tsv"
    producer = "`endopheno validate` (DVC stage validate)"
    if not path.exists():
        s.lack(f"The validation {path}", producer)
        return s
    v = json.loads(path.read_text())
    sets = pd.DataFrame.from_dict(v.get("feature_sets", {}), orient="index")
    if len(sets):
        s.add(table(sets.rename_axis("feature set").reset_index()))
    for name, reason in v.get("missing", {}).items():     # a set `endopheno validate` found no finished GWAS of
        s.lack(f"The validation of {name} ({reason})", f"{producer}, after the GWAS of {name} (DVC stage gwas@{name}),")
    if v.get("targets"):
        s.add(table(pd.DataFrame({"target": list(v["targets"]),
                                  "value": [json.dumps(x) if not isinstance(x, str) else x for x in v["targets"].values()]})))
    if loci.exists():
        s.heading("Planted and false loci")
        s.add(table(pd.read_csv(loci, sep="\t")))
    else:
        s.lack(f"The locus table {loci}", producer)
    return s

