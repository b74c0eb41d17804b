"""`generate`: the whole phantom cohort, a BIDS dataset + PLINK genotypes + the ground truth.

Every random draw that shapes a subject is taken here, in order, from one seeded generator, and the
per-subject noise from a generator seeded by (seed, subject index): the same params give the same
cohort whatever the number of workers.

Effect model, on the log volume of region r of subject i (all effects are relative changes):

    log V_ir = log(1 + ad_r) * severity_i + log(1 + age_r) * (age_i - reference_age)
               + sqrt(R_r) * sum_causal sqrt(h2) * standardised dosage_i
               + sqrt(region_sd^2 - R_r sum h2 - warp_var_r) * z_ir
               + population shift
    severity_i = 0 for CN, ~ N(1, severity_sd) clipped at 0 for AD (mild AD overlaps CN, as MCI does)

z_ir is normal, correlated between the two hemispheres of a region; warp_var_r is the variance the random
warp itself gives the region's log volume (estimated on a few warps), so that the individual SD given
diagnosis and age is region_sd. On top of this come the head size (scaled by sex) and a global atrophy by
age and diagnosis. R_r is the variance of log V_r that an analysis adjusting for diagnosis, age and sex
leaves (`residual_variance`: region_sd^2 + head size + severity within AD), so each causal variant
explains its h2 of what a GWAS with those covariates sees, and its power at a cohort size is predictable
(non-centrality ~ N h2 / (1 - h2)). The volumes written to ground_truth/subjects.tsv are measured on the
final anatomy, so they are the truth whatever the model.
"""

from __future__ import annotations

import json
import logging
import shutil
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from endopheno import __version__, mni
from endopheno.errors import EndophenoError
from endopheno.parallel import map_items
from endopheno.phantom import acquisition as acq_mod
from endopheno.phantom.anatomy import Anatomy, atrophy_map, random_warp
from endopheno.phantom.genetics import pick_causal, simulate, write_plink
from endopheno.phantom.regions import BY_NAME, REGIONS, contraction_gain, label_image

log = logging.getLogger(__name__)

SITES = {  # per-site scanner: noise differs by site, as between ADNI's scanners
    "site1": {"Manufacturer": "Siemens", "ManufacturersModelName": "Prisma", "MagneticFieldStrength": 3},
    "site2": {"Manufacturer": "GE", "ManufacturersModelName": "Discovery MR750", "MagneticFieldStrength": 3},
    "site3": {"Manufacturer": "Philips", "ManufacturersModelName": "Achieva", "MagneticFieldStrength": 1.5},
}


@lru_cache(maxsize=4)
def _psf_template(fwhm_mm: float) -> np.ndarray:
    return mni.smooth_to(mni.t1(), fwhm_mm)


def _render_subject(task: dict[str, Any], bids: Path) -> dict[str, float]:
    """Worker: build one subject's anatomy, scan it, write the NIfTI and its sidecar; return the truth."""
    rng = np.random.default_rng([task["seed"], task["index"]])
    a = task["anatomy"]
    anatomy = Anatomy(a["head_scale"], a["global_contraction"], a["contraction"], random_warp(rng, a["warp_sd_mm"], a["warp_smoothness_mm"]))
    acq = acq_mod.Acquisition(**task["acquisition"])
    img = acq_mod.render(anatomy, acq, _psf_template(float(np.mean(acq.voxel_size))), rng)
    anat = bids / f"sub-{task['subject_id']}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    stem = anat / f"sub-{task['subject_id']}_T1w"
    nib.save(img, str(stem) + ".nii.gz")
    (Path(str(stem) + ".json")).write_text(json.dumps(task["sidecar"], indent=2) + "\n")
    return anatomy.region_volumes()


def warp_variance(anatomy_params: dict, seed: int, n: int = 16) -> dict[str, float]:
    """Variance of each region's log volume due to the random warp alone, over `n` warps."""
    rng = np.random.default_rng([seed, 2**20])
    logs = [Anatomy(1.0, 0.0, {}, random_warp(rng, anatomy_params["warp_sd_mm"], anatomy_params["warp_smoothness_mm"])).region_volumes()
            for _ in range(n)]
    return {r.name: float(np.var([np.log(v[r.name]) for v in logs], ddof=1)) for r in REGIONS}


def residual_variance(p: dict, region_group: str) -> float:
    """Variance of a region's log volume given diagnosis, age and sex (the usual GWAS covariates):
    the individual term (region_sd^2), the head size within sex (volume ~ scale^3) and the AD severity
    within the AD group (pooled over groups, clipping at 0 ignored), the whole-brain atrophy included."""
    d, a = p["demographics"], p["anatomy"]
    ad_log = np.log1p(p["effects"][region_group]["ad"]) + np.log1p(p["effects"]["whole_brain"]["ad"])
    return float(p["region_sd"] ** 2 + 9 * a["head_scale_sd"] ** 2 + d["ad_fraction"] * (d["ad_severity_sd"] * ad_log) ** 2)


def _subject_effects(p: dict, n: int, severity: np.ndarray, age: np.ndarray, population: np.ndarray, causal_std: dict[str, np.ndarray], warp_var: dict[str, float], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Log volume factor per region (name -> (n,)) from the effect model in the module docstring."""
    effects, sd, ref = p["effects"], p["region_sd"], p["reference_age"]
    groups = sorted({r.group for r in REGIONS})
    shared = {g: rng.standard_normal(n) for g in groups}
    rho = p["bilateral_correlation"]
    log_f = {}
    for region in REGIONS:
        e = effects[region.group]
        z = np.sqrt(rho) * shared[region.group] + np.sqrt(1 - rho) * rng.standard_normal(n)
        genetic = causal_std.get(region.name, [])
        h2 = sum(h for h, _ in genetic)
        seen = residual_variance(p, region.group)
        residual_var = sd**2 - seen * h2 - warp_var[region.name]
        if residual_var < 0:
            log.warning("region %s: the random warp and the causal variants vary its volume more than region_sd", region.name)
        individual = np.sqrt(max(residual_var, 0.0)) * z + np.sqrt(seen) * sum(np.sqrt(h) * g for h, g in genetic)
        shift = p["genetics"]["population_shift_sd"] * sd * population if region.tissue == "gm" else 0.0
        log_f[region.name] = np.log1p(e["ad"]) * severity + np.log1p(e["age_per_year"]) * (age - ref) + individual + shift
    return log_f


def generate(out: str | Path, params: dict[str, Any], *, subjects: int | None = None, seed: int | None = None, workers: int | None = None) -> dict[str, Any]:
    """Generate the phantom cohort into `out` (replacing what is there) from the `phantom` section of
    params.yaml. Returns a summary. Layout: out/bids (BIDS dataset), out/genotypes/phantom.{bed,bim,fam},
    out/atlas (the template's region atlas), out/ground_truth (never read by the pipeline)."""
    p = dict(params)
    n = int(subjects if subjects is not None else p["subjects"])
    seed = int(seed if seed is not None else p["seed"])
    g, a, q = p["genetics"], p["anatomy"], p["acquisition"]
    if n < 2:
        raise EndophenoError(f"--subjects {n}: a cohort needs at least 2 subjects")
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    bids, truth = tmp / "bids", tmp / "ground_truth"
    bids.mkdir(parents=True)
    truth.mkdir()
    rng = np.random.default_rng(seed)

    # Genetics first: the population of each individual shapes its phenotype.
    n_extra = int(g["extra_genotyped_samples"])
    log.info("simulating genotypes of %d individuals with msprime", n + n_extra)
    geno = simulate(
        n + n_extra, seed=int(rng.integers(2**31)), chromosomes=g["chromosomes"], chromosome_length_mb=g["chromosome_length_mb"],
        effective_size=g["effective_size"], recombination_rate=g["recombination_rate"], mutation_rate=g["mutation_rate"],
        min_maf=g["min_maf"], second_population_fraction=g["second_population_fraction"], split_generations=g["split_generations"],
    )
    subject_ids = [f"ph{i + 1:04d}" for i in range(n + n_extra)]
    population = geno.population[:n]

    # Demographics.
    d = p["demographics"]
    sex = np.where(rng.random(n) < d["male_fraction"], "M", "F")
    age = np.clip(rng.normal(d["age_mean"], d["age_sd"], n), d["age_min"], d["age_max"]).round(1)
    diagnosis = np.where(rng.random(n) < d["ad_fraction"], "AD", "CN")
    severity = np.where(diagnosis == "AD", np.clip(rng.normal(1.0, d["ad_severity_sd"], n), 0.0, None), 0.0)
    site = rng.choice(sorted(SITES)[: q["sites"]], n)

    # Causal variants: standardised with the subjects' own allele frequency.
    causal = pick_causal(geno, len(g["causal"]), g["causal_min_maf"], rng)
    causal_std: dict[str, list] = {}
    betas = []
    for row, spec in zip(causal.itertuples(), g["causal"]):
        dose = geno.dosage[row.index, :n].astype(float)
        f = dose.mean() / 2
        causal_std.setdefault(spec["region"], []).append((spec["variance_explained"], (dose - 2 * f) / np.sqrt(2 * f * (1 - f))))
        betas.append(np.sqrt(residual_variance(p, BY_NAME[spec["region"]].group) * spec["variance_explained"]) / np.sqrt(2 * f * (1 - f)))
    causal = causal.drop(columns="index").assign(
        region=[c["region"] for c in g["causal"]], variance_explained=[c["variance_explained"] for c in g["causal"]],
        beta_log_volume_per_allele=betas,
    )

    log_f = _subject_effects(p, n, severity, age, population, causal_std, warp_variance(a, seed), rng)
    gains = {r.name: contraction_gain(r) for r in REGIONS}
    contraction = {name: np.clip(-lf / gains[name], -0.3, 0.6) for name, lf in log_f.items()}
    wb = p["effects"]["whole_brain"]
    global_contraction = -(np.log1p(wb["ad"]) * severity + np.log1p(wb["age_per_year"]) * (age - p["reference_age"])) / 3
    head_scale = np.where(sex == "M", a["head_scale_male"], a["head_scale_female"]) * np.exp(rng.normal(0, a["head_scale_sd"], n))

    # Acquisition, drawn per subject.
    tasks = []
    for i in range(n):
        orientation = str(rng.choice(q["orientations"]))
        voxel_size = tuple(float(v) for v in q["voxel_sizes"][rng.integers(len(q["voxel_sizes"]))])
        pose = acq_mod.random_pose(rng, q["max_rotation_deg"], q["max_translation_mm"])
        shape, affine = acq_mod.grid_affine(orientation, voxel_size, q["fov_mm"], q["fov_centre_mm"])
        site_i = str(site[i])
        acquisition = dict(
            site=site_i, orientation=orientation, voxel_size=voxel_size, shape=shape, affine=affine, pose=pose,
            noise_sd=float(q["noise_sd"][sorted(SITES).index(site_i)]), bias_coef=acq_mod.random_bias(rng, q["bias_strength"]),
            gain=float(rng.uniform(*q["gain_range"])), dtype=str(rng.choice(q["dtypes"])),
        )
        tasks.append({
            "index": i, "seed": seed, "subject_id": subject_ids[i], "acquisition": acquisition,
            "anatomy": {"head_scale": float(head_scale[i]), "global_contraction": float(global_contraction[i]),
                        "contraction": {k: float(v[i]) for k, v in contraction.items()},
                        "warp_sd_mm": a["warp_sd_mm"], "warp_smoothness_mm": a["warp_smoothness_mm"]},
            "sidecar": {**SITES[site_i], "InstitutionName": site_i, "MRAcquisitionType": "3D", "SeriesDescription": "MPRAGE (endopheno phantom)",
                        "RepetitionTime": 2.3, "EchoTime": 0.00298, "InversionTime": 0.9, "FlipAngle": 9,
                        "SliceThickness": voxel_size[0]},
        })

    volumes: dict[str, dict[str, float]] = {}
    failures = []
    for task, result in map_items(partial(_render_subject, bids=bids), tasks, workers=workers, label="phantom subjects"):
        if isinstance(result, Exception):
            failures.append(str(result))
        else:
            volumes[task["subject_id"]] = result
    if failures:
        raise EndophenoError(f"phantom: {len(failures)} subjects failed to render; first: {failures[0]}")

    # BIDS metadata.
    (bids / "dataset_description.json").write_text(json.dumps({
        "Name": "endopheno phantom cohort", "BIDSVersion": "1.9.0", "DatasetType": "raw", "License": "CC0",
        "GeneratedBy": [{"Name": "endopheno phantom", "Version": __version__, "Description": f"seed {seed}, {n} subjects"}],
    }, indent=2) + "\n")
    participants = pd.DataFrame({"participant_id": [f"sub-{s}" for s in subject_ids[:n]], "age": age, "sex": sex, "diagnosis": diagnosis, "site": site})
    participants.to_csv(bids / "participants.tsv", sep="\t", index=False)
    (bids / "participants.json").write_text(json.dumps({
        "age": {"Description": "age at scan", "Units": "year"},
        "sex": {"Description": "sex", "Levels": {"M": "male", "F": "female"}},
        "diagnosis": {"Description": "clinical diagnosis", "Levels": {"AD": "Alzheimer's disease", "CN": "cognitively normal"}},
        "site": {"Description": "acquisition site (scanner)"},
    }, indent=2) + "\n")

    # Genotypes: the imaged subjects minus a few never genotyped, plus a few genotyped but never imaged,
    # so that joining imaging and genetics has something to report, as with a real cohort.
    n_ungenotyped = int(g["ungenotyped_subjects"])
    columns = np.r_[np.arange(n - n_ungenotyped), np.arange(n, n + n_extra)]
    all_sex = np.r_[sex, rng.choice(["M", "F"], n_extra)]
    n_missing = write_plink(
        tmp / "genotypes" / "phantom", geno, [subject_ids[c] for c in columns], np.where(all_sex[columns] == "M", 1, 2),
        columns, g["missing_rate"], rng,
    )

    # The template's atlas: what Harvard-Oxford or AAL is to a real cohort, one parcellation of the
    # template shared by every subject. The pipeline may read it (atlas features, latent -> region maps);
    # the per-subject truth below it may not.
    labels, label_affine = label_image()
    (tmp / "atlas").mkdir()
    nib.save(nib.Nifti1Image(labels, label_affine), tmp / "atlas" / "regions.nii.gz")
    pd.DataFrame({"index": [r.label for r in REGIONS], "name": [r.name for r in REGIONS]}).to_csv(
        tmp / "atlas" / "regions.tsv", sep="\t", index=False)

    # Ground truth.
    ad_contraction = {r.name: float(-np.log1p(p["effects"][r.group]["ad"]) / gains[r.name]) for r in REGIONS}
    nib.save(nib.Nifti1Image(atrophy_map(ad_contraction), label_affine), truth / "ad_atrophy_map.nii.gz")
    pd.DataFrame([{
        "region": r.name, "label": r.label, "x": r.centre_mm[0], "y": r.centre_mm[1], "z": r.centre_mm[2],
        "radius_x": r.radii_mm[0], "radius_y": r.radii_mm[1], "radius_z": r.radii_mm[2], "tissue": r.tissue,
        "ad_effect": p["effects"][r.group]["ad"], "age_effect_per_year": p["effects"][r.group]["age_per_year"],
        "template_volume_mm3": float((labels == r.label).sum() * abs(np.linalg.det(label_affine[:3, :3]))),
    } for r in REGIONS]).to_csv(truth / "regions.tsv", sep="\t", index=False)
    causal.to_csv(truth / "causal_variants.tsv", sep="\t", index=False)
    genotyped = set(subject_ids[c] for c in columns)
    subjects_truth = pd.DataFrame({
        "subject_id": subject_ids[:n], "diagnosis": diagnosis, "severity": severity, "age": age, "sex": sex, "site": site,
        "population": population, "genotyped": [s in genotyped for s in subject_ids[:n]], "head_scale": head_scale,
        "global_contraction": global_contraction,
    })
    vol = pd.DataFrame.from_dict(volumes, orient="index").add_prefix("volume_").rename_axis("subject_id").reset_index()
    subjects_truth.merge(vol, on="subject_id").to_csv(truth / "subjects.tsv", sep="\t", index=False)
    (truth / "acquisition.json").write_text(json.dumps({
        t["subject_id"]: {
            **{k: v for k, v in t["acquisition"].items() if k not in ("affine", "pose", "bias_coef")},
            "voxel_to_scanner": t["acquisition"]["affine"].tolist(), "pose": t["acquisition"]["pose"].tolist(),
            "template_to_scanner": acq_mod.Acquisition(**t["acquisition"]).true_transform(t["anatomy"]["head_scale"]).tolist(),
            "head_scale": t["anatomy"]["head_scale"],
        } for t in tasks
    }, indent=1) + "\n")
    # The size and seed the cohort was made with (arguments override params.yaml's), then the rest.
    recorded = {"subjects": n, "seed": seed, **{k: v for k, v in p.items() if k not in ("subjects", "seed")}}
    (truth / "params.json").write_text(json.dumps(recorded, indent=2, default=str) + "\n")

    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return {"subjects": n, "variants": len(geno.variants), "genotyped": len(columns), "missing_calls": n_missing,
            "causal": len(causal), "AD": int((diagnosis == "AD").sum()), "out": str(out)}
