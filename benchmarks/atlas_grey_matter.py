"""How stable and how true the atlas set's grey-matter volumes are, on the phantom.

    python benchmarks/atlas_grey_matter.py [--store stores/volumes.zarr] [--phantom data/phantom] [--every 4]

For every `--every`-th subject of the MNI store, each grey-matter region's volume (`<region>_volume_mm3`
of features/atlas_regions.yaml: the middle class of a 3-class Gaussian mixture of the z-scored T1,
summed over the region, × the affine's Jacobian) with the mixture fitted five ways: on every 8th brain
voxel (the feature set's own `soft_grey_matter`), on every 8th from offset 1 (does the subsample matter?),
on every 2nd and every 32nd, and once for all subjects on their pooled voxels. Prints the seconds per subject of each,
each region's correlation with the true log volume (data/phantom/ground_truth), and the correlation of
the two every-8th fits across subjects, and how far the whole-brain total
moves between the fits.
"""

import argparse
import time

import numpy as np
import pandas as pd
import zarr
from sklearn.mixture import GaussianMixture

from endopheno.featurestore.atlas import atlas_from_files, soft_grey_matter
from endopheno.volumes.preprocess import open_mni


def mixture(v: np.ndarray) -> GaussianMixture:
    """`soft_grey_matter`'s fit on the voxels given (it fixes them to every 8th)."""
    return GaussianMixture(3, means_init=np.percentile(v, [10, 50, 90]).reshape(3, 1), random_state=0, max_iter=200,
                           tol=1e-4).fit(v)


def grey_matter(m: GaussianMixture, v: np.ndarray) -> np.ndarray:
    return m.predict_proba(v)[:, int(np.argsort(m.means_.ravel())[1])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="stores/volumes.zarr")
    ap.add_argument("--phantom", default="data/phantom")
    ap.add_argument("--every", type=int, default=4)
    a = ap.parse_args()

    ds = open_mni(a.store)
    brain = np.asarray(ds.brain_mask.values, bool)
    atlas = atlas_from_files(f"{a.phantom}/atlas/regions.nii.gz", f"{a.phantom}/atlas/regions.tsv", brain.shape,
                             np.asarray(ds.attrs["affine"]))
    labels, names = atlas.labels[brain], list(atlas.names)
    t1 = zarr.open_group(a.store, mode="r", path="mni")["T1w"]
    transforms = np.asarray(ds.template_to_native.values)
    rows = list(range(0, len(ds.subject), a.every))
    voxels = {i: np.asarray(t1[i])[brain].reshape(-1, 1).astype(np.float64) for i in rows}
    pooled = mixture(np.concatenate([voxels[i][::40] for i in rows[:50]]))
    ways = {"every 8th": lambda v: soft_grey_matter(v.ravel(), seed=0),
            "every 8th, offset 1": lambda v: grey_matter(mixture(v[1::8]), v),
            "every 2nd": lambda v: grey_matter(mixture(v[::2]), v),
            "every 32nd": lambda v: grey_matter(mixture(v[::32]), v),
            "pooled": lambda v: grey_matter(pooled, v)}
    volumes = {}
    for way, gm in ways.items():
        t0, per_subject = time.perf_counter(), []
        for i in rows:
            weights = gm(voxels[i]) * abs(np.linalg.det(transforms[i][:3, :3]))
            per_subject.append(np.append(np.bincount(labels, weights=weights, minlength=len(names) + 1)[1:], weights.sum()))
        volumes[way] = np.array(per_subject)
        print(f"{way}: {(time.perf_counter() - t0) / len(rows):.3f} s per subject", flush=True)

    truth = pd.read_csv(f"{a.phantom}/ground_truth/subjects.tsv", sep="\t").set_index("subject_id")
    subjects = [str(ds.subject.values[i]) for i in rows]
    regions = pd.read_csv(f"{a.phantom}/ground_truth/regions.tsv", sep="\t").set_index("region")
    print("r with the true log volume:")
    for j, region in enumerate(names):
        if region not in regions.index or regions.loc[region, "tissue"] != "gm":
            continue
        true = np.log(truth.loc[subjects, f"volume_{region}"].to_numpy())
        print(f"  {region:14s}", "  ".join(f"{way} {np.corrcoef(np.log(v[:, j]), true)[0, 1]:.3f}" for way, v in volumes.items()))
    same = [np.corrcoef(volumes["every 8th"][:, j], volumes["every 8th, offset 1"][:, j])[0, 1] for j in range(len(names))]
    print("every 8th against every 8th from offset 1, r per region:", " ".join(f"{r:.3f}" for r in same))
    base = volumes["every 8th"][:, -1]
    print("whole-brain grey matter against every 8th:", "  ".join(
        f"{way} r {np.corrcoef(v[:, -1], base)[0, 1]:.3f}, at most {np.abs(v[:, -1] / base - 1).max():.1%} apart"
        for way, v in volumes.items() if way != "every 8th"))


if __name__ == "__main__":
    main()
