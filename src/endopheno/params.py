"""Reading `params.yaml`, the one place every knob of the pipeline lives."""

from pathlib import Path
from typing import Any

import yaml

from endopheno.errors import EndophenoError


def load_params(section: str | None = None, path: str | Path = "params.yaml") -> dict[str, Any]:
    """Return `params.yaml` (or one top-level section of it) as a dict."""
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise EndophenoError(f"{path}: no such parameter file") from None
    except yaml.YAMLError as e:
        raise EndophenoError(f"{path}: not valid YAML ({e})") from None
    if section is None:
        return params
    if section not in params:
        raise EndophenoError(f"{path}: has no section '{section}'")
    return params[section]


def from_section(cls, section: dict | None, name: str, ignore: set[str] = frozenset()):
    """Build the dataclass `cls` from a params section, refusing keys it does not know (a typo in
    params.yaml must not silently fall back to a default)."""
    import dataclasses

    d = {k: v for k, v in (section or {}).items() if k not in ignore}
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise EndophenoError(f"{name}: unknown parameter(s) {', '.join(sorted(unknown))}")
    numbers = {"float": float, "float | None": float, "int": int, "int | None": int}
    for field in dataclasses.fields(cls):
        kind = numbers.get(field.type if isinstance(field.type, str) else getattr(field.type, "__name__", ""))
        # YAML 1.1 reads 3e-4 (no dot) as a string; a number knob must get a number or a clear error.
        if kind is not None and isinstance(d.get(field.name), str):
            try:
                value = float(d[field.name])
                if kind is int and not value.is_integer():
                    raise ValueError
                d[field.name] = kind(value)
            except ValueError:
                raise EndophenoError(f"{name}.{field.name}: {d[field.name]!r} is not a {'whole ' if kind is int else ''}number") from None
    return cls(**d)
