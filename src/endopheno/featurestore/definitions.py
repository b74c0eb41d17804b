"""Feature-set definitions: one YAML file per set in `features/`, reviewed in git like code.

A definition names the set, its entity, its integer `schema_version` (bumped on a breaking change, as
in Hopsworks), its producer (a registered model and version, or an atlas measurement) and its columns
with types and descriptions. A column entry with ``per: region`` is a template expanded once per atlas
region (``{region}_volume_mm3``); ``per: dimension`` expands over a model's embedding dimensions
(``f{dimension}`` → ``f000`` … ``f127``). A model-produced column names the model ``output`` it holds
(``embedding``, ``probability`` or ``prediction``; per-dimension columns hold the embedding). Every set also carries the key and provenance columns in
`STANDARD_COLUMNS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import yaml

from endopheno.errors import InputError

STANDARD_COLUMNS = {
    "subject_id": ("string", "BIDS participant label without `sub-`"),
    "session": ("string", "BIDS session label, null for single-session data"),
    "model_name": ("string", "what produced the row: a registered model's name, or `atlas`"),
    "model_version": ("string", "the producer's version"),
}
TYPES = {"float64": pa.float64(), "float32": pa.float32(), "int64": pa.int64(), "int32": pa.int32(),
         "string": pa.string(), "bool": pa.bool_()}
NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def key_columns(labels: list[str]) -> dict[str, list]:
    """The `subject_id` and `session` columns of the rows of MNI row labels (``<subject>_ses-<session>``
    where sessions exist): the catalog joins participants and genotypes on the subject alone."""
    from endopheno.volumes.preprocess import split_row_label

    keys = [split_row_label(label) for label in labels]
    return {"subject_id": [k[0] for k in keys], "session": [k[1] for k in keys]}


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    description: str
    per: str | None = None
    output: str | None = None   # model sets: which model output fills it


@dataclass(frozen=True)
class FeatureSet:
    """A parsed `features/<name>.yaml`."""

    name: str
    description: str
    schema_version: int
    producer: dict
    columns: tuple[Column, ...]
    entity: dict = field(default_factory=lambda: {"key": "subject_id", "session": "session"})
    path: Path | None = None

    @property
    def model_name(self) -> str:
        return str(self.producer.get("name", self.producer.get("model", self.producer.get("kind", ""))))

    @property
    def model_version(self) -> str:
        return str(self.producer.get("version", self.producer.get("alias", "")))

    def expanded_columns(self, regions: list[str] | None = None) -> list[Column]:
        """The feature columns with every ``per: region`` template expanded over `regions`."""
        out = []
        for c in self.columns:
            if c.per is None:
                out.append(c)
                continue
            if regions is None:
                raise InputError(self.name, f"column {c.name} is per {c.per}, but no {c.per} names were given")
            out += [Column(c.name.format(**{c.per: r}), c.type, c.description.format(**{c.per: r}), None, c.output)
                    for r in regions]
        return out

    def arrow_schema(self, regions: list[str] | None = None) -> pa.Schema:
        """The table's schema: subject_id, session, the features, model_name, model_version."""
        key = [pa.field(n, TYPES[STANDARD_COLUMNS[n][0]]) for n in ("subject_id", "session")]
        tail = [pa.field(n, TYPES[STANDARD_COLUMNS[n][0]]) for n in ("model_name", "model_version")]
        return pa.schema(key + [pa.field(c.name, TYPES[c.type]) for c in self.expanded_columns(regions)] + tail)


def load_definition(path: str | Path) -> FeatureSet:
    """Parse and validate one feature-set YAML file."""
    path = Path(path)
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise InputError(path, "no such feature-set definition") from None
    except yaml.YAMLError as e:
        raise InputError(path, f"not valid YAML ({e})") from None
    missing = {"name", "description", "schema_version", "producer", "columns"} - set(d)
    if missing:
        raise InputError(path, f"missing key(s) {', '.join(sorted(missing))}")
    if not NAME.match(str(d["name"])) or d["name"] != path.stem:
        raise InputError(path, f"name {d['name']!r} must be lower_snake_case and equal the file name ({path.stem})")
    if not isinstance(d["schema_version"], int) or d["schema_version"] < 1:
        raise InputError(path, "schema_version must be a positive integer")
    columns = []
    for c in d["columns"]:
        if not {"name", "type", "description"} <= set(c) or set(c) - {"name", "type", "description", "per", "output"}:
            raise InputError(path, f"column {c}: needs name, type, description (and optionally per, output)")
        if c["type"] not in TYPES:
            raise InputError(path, f"column {c['name']}: type {c['type']!r} is not one of {', '.join(TYPES)}")
        if c["name"] in STANDARD_COLUMNS:
            raise InputError(path, f"column {c['name']} is a standard column every set has already")
        output = c.get("output", "embedding" if c.get("per") == "dimension" else None)
        columns.append(Column(c["name"], c["type"], c["description"].strip(), c.get("per"), output))
    entity = d.get("entity") or {"key": "subject_id", "session": "session"}
    return FeatureSet(d["name"], d["description"].strip(), d["schema_version"], dict(d["producer"]), tuple(columns),
                      entity, path)


def definitions(folder: str | Path = "features") -> dict[str, FeatureSet]:
    """Every definition in `folder`, by name."""
    return {p.stem: load_definition(p) for p in sorted(Path(folder).glob("*.yaml"))}


def definition(name: str, folder: str | Path = "features") -> FeatureSet:
    path = Path(folder) / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(definitions(folder)) or "none"
        raise InputError(name, f"no feature set of that name in {folder}/ (known: {known})")
    return load_definition(path)
