"""Feature sets as Delta Lake tables (deltalake): one table per set under `stores/features/<name>`,
one Delta commit per data version.

A data version is a whole snapshot of the set (``mode="overwrite"``): readers at any version see a
complete table, never a mixture. Each commit's metadata records where the data came from
(`PROVENANCE`): git revision, MLflow run id, model name and version, digest of the volume store read,
hash of the parameters, the schema version, an `input_digest` of all of them, the sha256 of the
participants table where the producer read it, and `failed_subjects` (a JSON list; ``[]`` = complete).
A version with failed subjects is never "unchanged": a rerun measures again. Delta Lake makes the
commit atomic (the log entry is created exclusively, after the Parquet files are complete), so a crash
mid-write leaves orphan Parquet files that no version references and the previous version intact; two
writers racing for the same version make one of them fail with `CommitFailedError`, and
`write_version` then re-reads the table and tries again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Schema, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from endopheno.errors import EndophenoError, InputError

log = logging.getLogger(__name__)

PROVENANCE = ("git_revision", "mlflow_run_id", "model_name", "model_version", "volume_store_digest",
              "params_hash", "schema_version", "input_digest", "participants_sha256", "failed_subjects")
COMMIT_ID = "endopheno_commit_id"


class SchemaChangeError(EndophenoError):
    """The columns changed but the definition's schema_version did not."""


class ConflictError(EndophenoError):
    """Other writers kept committing to the same feature set; this write gave up."""


@dataclass(frozen=True)
class WriteResult:
    version: int
    created: bool       # False: the latest version already held these inputs; nothing was written


def open_table(path: str | Path, version: int | None = None, as_of: str | dt.datetime | None = None) -> DeltaTable:
    """The feature set's Delta table at its latest version, at `version`, or as it was at time `as_of`
    (a datetime or an ISO 8601 string; naive times are UTC)."""
    path = Path(path)
    try:
        table = DeltaTable(str(path), version=version)
    except TableNotFoundError:
        raise InputError(path, "no feature set here (build it first, e.g. `endopheno features build NAME`)") from None
    except Exception as e:  # deltalake raises a bare exception type for a version that does not exist
        raise InputError(path, f"no version {version} ({table_versions_hint(path)})") from e
    if as_of is not None:
        when = dt.datetime.fromisoformat(as_of) if isinstance(as_of, str) else as_of
        when = when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)
        try:
            table.load_as_version(when)
        except Exception as e:
            raise InputError(path, f"no version existed at {when.isoformat()} ({table_versions_hint(path)})") from e
    return table


def table_versions_hint(path: Path) -> str:
    try:
        return f"versions 0..{DeltaTable(str(path)).version()}"
    except TableNotFoundError:
        return "no versions"


def check_path(path: str | Path) -> None:
    """deltalake (1.6) reads no commit history, and so no provenance, from a path with '#' in it (the
    table itself reads, its history is empty): refuse such a path rather than write or report nothing."""
    if "#" in str(Path(path).resolve()):
        raise InputError(path, "deltalake cannot keep a feature set's history under a path with '#' in it; "
                               "move or rename the folder")


def history(path: str | Path) -> list[dict]:
    """Every version of the set, oldest first: version, timestamp (UTC), rows, and the provenance."""
    check_path(path)
    rows = []
    for h in open_table(path).history():
        rows.append({"version": h["version"],
                     "timestamp": dt.datetime.fromtimestamp(h["timestamp"] / 1000, dt.timezone.utc),
                     "rows": (h.get("operationMetrics") or {}).get("num_added_rows"),
                     **{k: h.get(k) for k in PROVENANCE}})
    return sorted(rows, key=lambda r: r["version"])


def latest_metadata(table: DeltaTable) -> dict:
    """The provenance of the table's current version."""
    h = table.history(1)[0]
    return {k: h.get(k) for k in PROVENANCE} | {"version": h["version"]}


def _fields(schema: pa.Schema | Schema) -> list[tuple[str, str]]:
    delta = schema if isinstance(schema, Schema) else Schema.from_arrow(schema)
    return [(f["name"], json.dumps(f["type"])) for f in json.loads(delta.to_json())["fields"]]


def digest(value) -> str:
    """A short content digest of a JSON-able value (params hashes, input digests)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def unchanged_version(path: str | Path, input_digest: str) -> tuple[int, int] | None:
    """(version, rows) of the latest version when it was built from `input_digest` and no subject failed,
    else None: a rebuild from identical inputs then measures nothing, and one after failures measures
    again. A version from before `failed_subjects` was recorded counts as incomplete."""
    if not DeltaTable.is_deltatable(str(path)):
        return None
    table = DeltaTable(str(path))
    latest = latest_metadata(table)
    complete = latest["failed_subjects"] == failed_subjects([])
    return (latest["version"], table.count()) if complete and latest["input_digest"] == input_digest else None


def failed_subjects(subjects) -> str:
    """The commit metadata's `failed_subjects`: the sorted subjects as a JSON list."""
    return json.dumps(sorted(map(str, subjects)))


def write_version(path: str | Path, table: pa.Table, metadata: dict, *, attempts: int = 8) -> WriteResult:
    """Commit `table` as the feature set's new version, unless the latest version has the same
    `metadata["input_digest"]` and the same failed subjects.

    `metadata` holds the `PROVENANCE` keys, `failed_subjects` as a list (absent: none failed). A table
    whose columns differ from the latest version's is refused (`SchemaChangeError`) unless its
    ``schema_version`` is higher. A commit that loses a race with another writer is retried up to
    `attempts` times (with a random back-off); the check for identical inputs is repeated each time,
    so two writers of the same inputs make one version.
    """
    path = Path(path)
    check_path(path)
    meta = {k: str(metadata.get(k, "")) for k in PROVENANCE}
    meta["failed_subjects"] = failed_subjects(metadata.get("failed_subjects", []))
    commit_id = uuid.uuid4().hex
    with _writer_lock(path):
        return _write_version(path, table, meta, commit_id, attempts)


@contextlib.contextmanager
def _writer_lock(path: Path):
    """One endopheno writer per feature set at a time on this machine. Delta's optimistic concurrency
    alone let two racing overwrites both land (measured under load: a version with both writers' rows,
    and two versions for one input): its conflict check does not see a concurrent overwrite as one.
    The lock makes check-then-commit atomic; other Delta writers still meet the retry below."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_schema(path: str | Path, schema: pa.Schema, schema_version) -> str | None:
    """Whether a version with `schema` may follow the latest one: None (no table yet, or the same columns),
    ``"overwrite"`` (other columns and a higher `schema_version`), else `SchemaChangeError`. Builders call
    it before measuring, so that a forgotten schema_version bump fails in seconds, not after the work."""
    if not DeltaTable.is_deltatable(str(path)):
        return None
    current = DeltaTable(str(path))
    old, new = dict(_fields(current.schema())), dict(_fields(schema))
    if old == new:
        return None
    if int(schema_version or 0) <= int(latest_metadata(current)["schema_version"] or 0):
        changed = sorted(set(old) ^ set(new)) + sorted(k for k in set(old) & set(new) if old[k] != new[k])
        raise SchemaChangeError(
            f"{path}: the columns changed ({', '.join(changed[:6])}{' …' if len(changed) > 6 else ''}) but "
            f"schema_version is still {schema_version}: a breaking change needs a higher "
            f"schema_version in the feature set's definition")
    return "overwrite"


def _write_version(path: Path, table: pa.Table, meta: dict, commit_id: str, attempts: int) -> WriteResult:
    for attempt in range(1, attempts + 1):
        schema_mode = None
        if DeltaTable.is_deltatable(str(path)):
            latest = latest_metadata(DeltaTable(str(path)))
            # Same inputs and the same subjects failing (measurement is deterministic): the same rows.
            if (latest["input_digest"], latest["failed_subjects"]) == (meta["input_digest"], meta["failed_subjects"]):
                return WriteResult(latest["version"], created=False)
            schema_mode = check_schema(path, table.schema, meta["schema_version"])
        try:
            write_deltalake(str(path), table, mode="overwrite", schema_mode=schema_mode,
                            commit_properties=CommitProperties(custom_metadata={**meta, COMMIT_ID: commit_id}))
        except CommitFailedError as e:
            log.info("%s: commit conflict (attempt %d of %d): %s", path, attempt, attempts, e)
            time.sleep(random.uniform(0.05, 0.2) * attempt)
            continue
        for h in DeltaTable(str(path)).history(attempts + 8):
            if h.get(COMMIT_ID) == commit_id:
                return WriteResult(h["version"], created=True)
        raise ConflictError(f"{path}: the commit landed but could not be found in the recent history")
    raise ConflictError(f"{path}: {attempts} commits in a row lost a race with other writers of this feature set; "
                        f"nothing was written, try again")


def snapshot_files(path: str | Path, version: int | None = None, relative_to: str | Path | None = None) -> list[str]:
    """The Parquet files making up one version, relative to `relative_to` when given (so that a
    catalog's views work from any copy of the repository)."""
    uris = open_table(path, version).file_uris()
    # deltalake percent-encodes the paths ("sp%20ace", "%23", "%C3%A9"): decode them to file names.
    files = [unquote(u.removeprefix("file://")) for u in uris]
    return [os.path.relpath(f, relative_to) for f in files] if relative_to is not None else files
