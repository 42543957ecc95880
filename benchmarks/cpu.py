"""CPU seconds used by this process and its own Ray shard workers, read from /proc (Linux).

Wall time is what the figures are about, but on a shared machine other people's processes stretch it.
CPU time (user + system) of the processes doing the work is far less sensitive to that, so the suite
reports each ratio in CPU time as well. Only this driver's descendants count: the local Ray it started
(or joined from the same process tree, as in the tests) and its `ShardWorker` actors.
"""

from __future__ import annotations

import os

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: str) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def tree_cpu_seconds(worker_prefix: str = "ray::ShardWorker") -> float | None:
    """CPU seconds so far of this process plus every descendant whose title starts with ``worker_prefix``.
    None where /proc is not available."""
    if not os.path.isdir("/proc/self"):
        return None
    stats = {p: s for p in os.listdir("/proc") if p.isdigit() and (s := _stat(p)) is not None}
    children: dict[int, list[str]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    me = str(os.getpid())
    total = stats.get(me, (0, 0.0))[1]
    todo = list(children.get(int(me), []))
    while todo:
        pid = todo.pop()
        todo += children.get(int(pid), [])
        if _cmdline(pid).startswith(worker_prefix):
            total += stats[pid][1]
    return total


def machine_busy_seconds() -> tuple[float, float] | None:
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat; None without /proc.
    busy - our own `tree_cpu_seconds` over a phase is what other jobs used meanwhile."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / _TICK, steal / _TICK
