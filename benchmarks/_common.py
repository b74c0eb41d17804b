"""Helpers shared by the benchmark scripts."""

import os
import platform
from pathlib import Path


def machine() -> str:
    # "AMD EPYC" names several generations, up to twice as fast as each other here: the family and model
    # numbers tell them apart (family 25: Zen 3/4, 26: Zen 5).
    info = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    cpu = info.get("model name", platform.processor())
    if "cpu family" in info:
        cpu += f", family {info['cpu family']} model {info.get('model', '?')}"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{len(os.sched_getaffinity(0))} cores ({cpu}), {mem:.0f} GiB RAM, Python {platform.python_version()}"


def du(path: Path) -> int:
    """Bytes on disk of a file or folder (apparent size of its files)."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
