"""Stage `report`: stores/report/index.html (params.yaml `report`): cohort, QC, models, attribution, GWAS,
validation and lineage in one self-contained folder with every figure as PNG; a section whose input is
missing names the command that writes it."""

from _stage import run

if __name__ == "__main__":
    run("report", {})
