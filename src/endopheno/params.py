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
        # PyYAML's message spans lines (the offending line, a caret): the CLI prints one
        raise EndophenoError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(params, dict):
        raise EndophenoError(f"{path}: not a parameter file (its top level is a {type(params).__name__}, not sections)")
    if section is None:
        return params
    if section not in params:
        raise EndophenoError(f"{path}: has no section '{section}'")
    return _mapping(params[section], f"{path}: section '{section}'")


def load_section(section: str, path: str | Path = "params.yaml") -> dict[str, Any]:
    """One section of a command's `--params` file: {} where the file does not exist (the command's
    defaults), has no such section or leaves it null; an error where the section is not a mapping."""
    path = Path(path)
    if not path.exists():
        return {}
    return _mapping(load_params(None, path).get(section), f"{path}: section '{section}'") or {}


def _mapping(value, what: str):
    if value is not None and not isinstance(value, dict):
        raise EndophenoError(f"{what} must map parameter names to values, not be {type(value).__name__} {str(value)[:40]}")
    return value


def from_section(cls, section: dict | None, name: str, ignore: set[str] = frozenset()):
    """Build the dataclass `cls` from a params section, refusing keys it does not know (a typo in
    params.yaml must not silently fall back to a default)."""
    import dataclasses

    _mapping(section, name)
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
