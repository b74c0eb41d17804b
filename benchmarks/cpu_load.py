"""Busy cores over time, to see where a run leaves cores idle.

    python benchmarks/cpu_load.py > load.tsv &   # then run the work, e.g. a time-stamped `dvc repro`
    kill %1

Every second one line `seconds  busy_cores`: the machine's cores × the share of non-idle time in
/proc/stat (Linux) over that second. The whole machine is measured, so run nothing else beside it.
"""

import os
import time


def cpu_times() -> tuple[int, int]:
    """(total, idle + iowait) jiffies of all cores."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields), fields[3] + fields[4]


def main() -> None:
    cores, start, before = os.cpu_count() or 1, time.time(), cpu_times()
    while True:
        time.sleep(1.0)
        now = cpu_times()
        total, idle = now[0] - before[0], now[1] - before[1]
        print(f"{time.time() - start:.0f}\t{cores * (1 - idle / max(total, 1)):.2f}", flush=True)
        before = now


if __name__ == "__main__":
    main()
