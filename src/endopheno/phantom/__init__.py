"""The phantom cohort: realistic demo data with known truth (anatomy, acquisition, genetics)."""

from endopheno.phantom.cohort import generate

__all__ = ["generate"]
