"""Stage `phantom`: generate the demo cohort (BIDS + PLINK + ground truth) from params.yaml `phantom`."""

from _stage import params, run

if __name__ == "__main__":
    p = params("phantom")
    run("phantom", {"out": p["out"], "workers": p["workers"] or None})
