"""The phantom cohort: valid BIDS and PLINK files, deterministic, and a truth that matches the images."""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from bed_reader import open_bed
from scipy import ndimage as ndi

from endopheno import mni
from endopheno.phantom import generate
from endopheno.phantom.anatomy import Anatomy, atrophy_map, random_warp
from endopheno.phantom.genetics import simulate
from endopheno.phantom.regions import BY_NAME, REGIONS, contraction_gain, label_image

from conftest import small_params


def test_bids_layout(phantom_dir):
    bids = phantom_dir / "bids"
    desc = json.loads((bids / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] and desc["Name"]
    participants = pd.read_csv(bids / "participants.tsv", sep="\t")
    assert list(participants.columns) == ["participant_id", "age", "sex", "diagnosis", "site"]
    assert participants["participant_id"].str.match(r"^sub-[A-Za-z0-9]+$").all()
    assert set(participants["diagnosis"]) <= {"AD", "CN"} and set(participants["sex"]) <= {"M", "F"}
    orientations, dtypes = set(), set()
    for pid in participants["participant_id"]:
        img = nib.load(bids / pid / "anat" / f"{pid}_T1w.nii.gz")
        sidecar = json.loads((bids / pid / "anat" / f"{pid}_T1w.json").read_text())
        assert sidecar["MagneticFieldStrength"] in (1.5, 3) and img.ndim == 3
        orientations.add(nib.aff2axcodes(img.affine))
        dtypes.add(img.get_data_dtype().name)
        zooms = img.header.get_zooms()
        assert min(zooms) >= 1.0 and max(zooms) <= 3.0
    assert len(orientations) > 1  # scanners write different orientations


def test_plink_files(phantom_dir):
    p = small_params()
    bed = open_bed(phantom_dir / "genotypes" / "phantom.bed")
    val = bed.read()
    participants = pd.read_csv(phantom_dir / "bids" / "participants.tsv", sep="\t")
    subjects = set(participants["participant_id"].str.removeprefix("sub-"))
    iids = set(bed.iid)
    # One imaged subject is not genotyped and one genotyped sample is not imaged, as configured.
    assert len(subjects - iids) == 1 and len(iids - subjects) == 1
    freq = np.nanmean(val, axis=0) / 2
    assert np.all(np.minimum(freq, 1 - freq) >= p["genetics"]["min_maf"] - 0.05)  # missing calls shift it a little
    assert 0 < np.isnan(val).mean() < 0.02
    assert set(np.unique(bed.chromosome)) == {"1", "2"}
    assert np.all(np.diff(bed.bp_position[bed.chromosome == "1"]) > 0)
    causal = pd.read_csv(phantom_dir / "ground_truth" / "causal_variants.tsv", sep="\t")
    assert set(causal["id"]) <= set(bed.sid) and causal["chrom"].nunique() == len(causal)


def test_true_transform_maps_template_onto_subject(phantom_dir):
    """Sampling a subject's image at the true template->scanner transform of the template's brain
    voxels must give back the template's contrast: the recorded truth is the real pose."""
    truth = json.loads((phantom_dir / "ground_truth" / "acquisition.json").read_text())
    t1 = mni.t1()
    tdata = np.asarray(t1.dataobj)
    ijk = np.argwhere(tdata > 0)[::97].T
    pts = t1.affine[:3, :3] @ ijk + t1.affine[:3, 3:4]
    for subject, acq in truth.items():
        img = nib.load(phantom_dir / "bids" / f"sub-{subject}" / "anat" / f"sub-{subject}_T1w.nii.gz")
        a = np.asarray(acq["template_to_scanner"])
        vox = mni.world_to_voxel(img.affine, a[:3, :3] @ pts + a[:3, 3:4])
        sampled = ndi.map_coordinates(img.get_fdata(dtype=np.float32), vox, order=1)
        assert np.corrcoef(sampled, tdata[tuple(ijk)])[0, 1] > 0.7, subject
        wrong = np.eye(4)
        wrong[:3, 3] = 10.0  # a 17 mm error must be visible in the same measure
        vox = mni.world_to_voxel(img.affine, (wrong @ a)[:3, :3] @ pts + (wrong @ a)[:3, 3:4])
        assert np.corrcoef(ndi.map_coordinates(img.get_fdata(dtype=np.float32), vox, order=1), tdata[tuple(ijk)])[0, 1] < 0.6


def test_ground_truth_files(phantom_dir):
    gt = phantom_dir / "ground_truth"
    subjects = pd.read_csv(gt / "subjects.tsv", sep="\t")
    for r in REGIONS:
        assert (subjects[f"volume_{r.name}"] > 0).all()
    labels = nib.load(phantom_dir / "atlas" / "regions.nii.gz")
    assert set(np.unique(np.asarray(labels.dataobj))) == {0, *[r.label for r in REGIONS]}
    table = pd.read_csv(phantom_dir / "atlas" / "regions.tsv", sep="\t")
    assert dict(zip(table["name"], table["index"])) == {r.name: r.label for r in REGIONS}
    atrophy = np.asarray(nib.load(gt / "ad_atrophy_map.nii.gz").dataobj)
    lab = np.asarray(labels.dataobj)
    assert atrophy[lab == BY_NAME["hippocampus_L"].label].mean() > 0.1   # AD shrinks the hippocampus
    assert atrophy[lab == BY_NAME["ventricle_L"].label].mean() < -0.1    # and enlarges the ventricles
    assert np.abs(atrophy[:, :, :12]).max() < 0.01  # and leaves the lower brain stem (MNI z < -60 mm) alone


@pytest.mark.parametrize("name,change", [("hippocampus_L", -0.20), ("amygdala_R", -0.15), ("ventricle_L", 0.30)])
def test_contraction_reaches_the_planted_volume_change(name, change):
    region = BY_NAME[name]
    a = -np.log1p(change) / contraction_gain(region)
    base = Anatomy(1.0, 0.0, {}, np.zeros((3, *random_warp(np.random.default_rng(0), 1, 20).shape[1:]), np.float32))
    changed = Anatomy(1.0, 0.0, {name: a}, base.warp)
    ratio = changed.region_volumes()[name] / base.region_volumes()[name]
    assert ratio == pytest.approx(1 + change, abs=0.04)
    # The template itself is measured as it is: no deformation, the label count.
    labels, affine = label_image()
    assert base.region_volumes()[name] == pytest.approx((labels == region.label).sum(), rel=0.01)


def test_head_scale_scales_volumes():
    warp = np.zeros((3, *random_warp(np.random.default_rng(0), 1, 20).shape[1:]), np.float32)
    small, big = Anatomy(1.0, 0.0, {}, warp).region_volumes(), Anatomy(1.1, 0.0, {}, warp).region_volumes()
    assert big["hippocampus_R"] / small["hippocampus_R"] == pytest.approx(1.1**3, rel=0.02)


def test_same_seed_same_cohort(tmp_path):
    p = small_params(4)
    p["acquisition"]["dtypes"] = ["float32"]  # float32 shows every bit; int16 would hide small differences
    p["genetics"].update(chromosomes=1, causal=p["genetics"]["causal"][:1], extra_genotyped_samples=0, ungenotyped_subjects=0)
    digests = []
    for run, workers in (("a", 1), ("b", 2)):  # in this process, then in two worker processes
        generate(tmp_path / run, p, workers=workers)
        files = sorted(f for f in (tmp_path / run).rglob("*") if f.is_file())
        digests.append({f.relative_to(tmp_path / run).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files})
    assert digests[0] == digests[1]
    generate(tmp_path / "c", p, seed=p["seed"] + 1, workers=1)
    other = hashlib.sha256((tmp_path / "c" / "genotypes" / "phantom.bed").read_bytes()).hexdigest()
    assert other != digests[0]["genotypes/phantom.bed"]


def test_two_populations_differ_in_allele_frequency():
    kw = dict(seed=3, chromosomes=1, chromosome_length_mb=1.0, effective_size=10_000, recombination_rate=1e-8,
              mutation_rate=1.25e-8, min_maf=0.05)
    one = simulate(120, **kw)
    two = simulate(120, second_population_fraction=0.5, split_generations=4000, **kw)
    assert set(one.population) == {0} and set(two.population) == {0, 1}

    def fst(g):  # Hudson's Fst between the two halves (the populations in `two`)
        a, b = g.dosage[:, :60] / 2, g.dosage[:, 60:] / 2
        pa, pb = a.mean(1), b.mean(1)
        return np.mean((pa - pb) ** 2) / np.mean(pa * (1 - pb) + pb * (1 - pa))

    assert fst(two) > 0.05 > fst(one)


def test_atrophy_map_is_zero_without_effects():
    assert not atrophy_map({}).any()


def test_truth_records_the_size_and_seed_it_was_made_with(tmp_path):
    """`--subjects` and `--seed` override params.yaml: ground_truth/params.json must record the values the
    cohort was generated with, not the parameter file's."""
    p = small_params(6)
    p["genetics"].update(chromosomes=1, causal=p["genetics"]["causal"][:1], extra_genotyped_samples=0, ungenotyped_subjects=0)
    generate(tmp_path / "c", p, subjects=2, seed=p["seed"] + 5, workers=1)
    recorded = json.loads((tmp_path / "c" / "ground_truth" / "params.json").read_text())
    assert (recorded["subjects"], recorded["seed"]) == (2, p["seed"] + 5)
    assert len(pd.read_csv(tmp_path / "c" / "ground_truth" / "subjects.tsv", sep="\t")) == 2
    assert recorded["genetics"] == p["genetics"]  # the rest of the parameters as given
