"""Run one function over many independent items (subjects, volumes) with dask, showing progress.

Results come back in completion order, so that each subject is reported as soon as it is done and one
bad subject never stops the others: an `EndophenoError` raised for an item is returned in its place
and the caller reports it. `workers=1` without a scheduler runs in this process (tests, debugging);
otherwise a `dask.distributed.LocalCluster` of processes, or the cluster at `scheduler`
(e.g. ``tcp://10.0.0.5:8786``, a SLURM cluster started with dask-jobqueue).
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from endopheno.errors import EndophenoError

log = logging.getLogger(__name__)


class TaskFailed(EndophenoError):
    """An item failed with an error that is not a user's (a bug): the message keeps its type and text."""


def _guarded(fn: Callable[[Any], Any], item: Any, **shared: Any) -> Any:
    try:
        return fn(item, **shared)
    except EndophenoError as e:
        return e
    except Exception as e:  # noqa: BLE001 - one subject's crash must not stop the cohort
        log.debug("task failed:\n%s", traceback.format_exc())
        return TaskFailed(f"unexpected {type(e).__name__}: {e}")


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def progress(label: str) -> Progress:
    return Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), transient=False,
    )


def map_items(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    label: str = "working",
    shared: dict[str, Any] | None = None,
    processes: bool = True,
) -> Iterator[tuple[Any, Any]]:
    """Yield ``(item, result)`` for every item, in completion order.

    `shared` are keyword arguments common to every call (``fn(item, **shared)``), sent to each worker
    once rather than with every item. `processes=False` runs the local cluster's workers as threads of
    this process: for work that releases the GIL (BLAS, numpy, Arrow), it saves the process start-up
    and every copy. `result` is what ``fn(item)`` returned, or the `EndophenoError` it raised (for a bug: a
    `TaskFailed`). `fn` must be importable by name (a module-level function or a partial of one) so
    that dask can send it to worker processes.
    """
    items = list(items)
    if not items:
        return
    workers = workers or default_workers()
    with progress(label) as bar:
        task = bar.add_task(label, total=len(items))
        if scheduler is None and (workers == 1 or len(items) == 1):
            for item in items:
                result = _guarded(fn, item, **(shared or {}))
                bar.advance(task)
                yield item, result
            return
        import dask
        from dask.distributed import Client, LocalCluster, as_completed

        # dask sets MALLOC_TRIM_THRESHOLD_=65536 in its workers, which turns off glibc's adaptive mmap
        # threshold: every large temporary array is then mmapped and page-faulted afresh, and imaging
        # work spends half its time in the kernel (measured: sys time 2.5 min of 4 for the phantom).
        environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}),
                   "MALLOC_TRIM_THRESHOLD_": str(2**30), "MALLOC_MMAP_THRESHOLD_": str(2**28)}

        for name in list(logging.root.manager.loggerDict):  # distributed sets its own INFO levels on import
            if name.startswith("distributed"):
                logging.getLogger(name).setLevel(logging.ERROR)
        if scheduler:
            cluster, client = None, Client(scheduler)
        else:
            dask.config.set({"distributed.nanny.pre-spawn-environ": environ})
            n = min(workers, len(items))
            # Worker logs below CRITICAL are silenced: a worker whose heartbeat races the scheduler's
            # shutdown logs a harmless "Failed to communicate with scheduler" traceback at ERROR
            # (dask/distributed#7105, open). A worker that really dies still reaches us, as the
            # KilledWorker its future raises.
            cluster = LocalCluster(
                n_workers=n if processes else 1, threads_per_worker=1 if processes else n, processes=processes,
                dashboard_address=None, silence_logs=logging.CRITICAL,
            )
            client = Client(cluster)
        try:
            scattered = {k: client.scatter([v], broadcast=True)[0] for k, v in (shared or {}).items()}
            futures = client.map(_guarded, [fn] * len(items), items, pure=False, **scattered)
            index = {f.key: i for i, f in enumerate(futures)}
            for future in as_completed(futures):
                result = future.result()
                bar.advance(task)
                yield items[index[future.key]], result
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
