"""Pinned load with wrk, CPU accounting per thread, and instruction counts under callgrind.

The method an operator sizing a box would use: the load generator on one core
(``taskset -c 0 wrk -t1``), the whole server, every thread, on the other (``taskset -a -cp 1``),
so a slow Python client never holds the baseline down.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

__all__ = [
    "LOAD_CPU",
    "SERVER_CPU",
    "WrkResult",
    "can_count_instructions",
    "can_pin",
    "instructions_since_zero",
    "lua_script",
    "pin",
    "pooled_percentile",
    "thread_cpu_seconds",
    "under_callgrind",
    "wrk",
    "zero_instructions",
]

LOAD_CPU = "0"
SERVER_CPU = "1"


def can_pin() -> bool:
    """True when wrk and taskset are installed and the machine has two cores to split."""
    return bool(shutil.which("wrk") and shutil.which("taskset") and (os.cpu_count() or 1) >= 2)


def can_count_instructions() -> bool:
    return bool(shutil.which("valgrind") and shutil.which("callgrind_control"))


def pin(pid: int, cpu: str = SERVER_CPU) -> None:
    """Pin every thread of ``pid`` (and the threads it starts later) to ``cpu``."""
    subprocess.run(["taskset", "-a", "-cp", cpu, str(pid)], check=True, stdout=subprocess.DEVNULL)


def thread_cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User+system CPU seconds of a process (all threads), or of one of its threads."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Percentiles wrk reports besides min and max, dense near p99 so that the p99 of several runs
# together (pooled_percentile) is interpolated between close points.
GRID = (50, 75, 90, 95, 97, 98, 98.5, 99, 99.25, 99.5, 99.75, 99.9, 99.99)


def lua_script(path: str, headers: dict[str, str], template: str, prefix: str) -> str:
    """A wrk script POSTing ``template`` % (prefix, n) with a fresh n per request.

    ``done`` prints two machine-readable lines: requests, seconds, non-2xx answers, socket
    errors, p50 and p99 in microseconds; then the latency at each of ``GRID``'s percentiles.
    """
    header_lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    body = template.replace('"', '\\"')
    grid = ", ".join(f"{p:g}" for p in GRID)
    return f"""
wrk.method = "POST"
{header_lines}
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, "{path}", nil, string.format("{body}", "{prefix}", n))
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK %d %f %d %d %f %f\\n", summary.requests,
    summary.duration / 1e6, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
  local points = {{}}
  for _, p in ipairs({{{grid}}}) do
    points[#points + 1] = string.format("%g:%f", p, latency:percentile(p))
  end
  io.write(string.format("WRKGRID 0:%f %s 100:%f\\n", latency.min,
    table.concat(points, " "), latency.max))
end
"""


@dataclass
class WrkResult:
    requests: int
    seconds: float
    non_2xx: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    # (percentile, ms) from 0 (the fastest request) to 100 (the slowest).
    distribution: tuple[tuple[float, float], ...] = ()

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def fraction_within(self, ms: float) -> float:
        """The fraction of requests that took at most ``ms``, interpolated on the grid."""
        points = self.distribution
        if ms < points[0][1]:
            return 0.0
        for (p0, v0), (p1, v1) in pairwise(points):
            if ms < v1:
                return (p0 + (p1 - p0) * (ms - v0) / (v1 - v0)) / 100
        return 1.0


def pooled_percentile(results: list[WrkResult], percentile: float) -> float:
    """The percentile (ms) of the requests of several runs taken together.

    Not the median or mean of the runs' percentiles: a minute's p99 is the latency 1% of that
    minute's requests exceed, so one run with a long tail weighs by how many requests it had.
    Each run's latency distribution is interpolated between wrk's grid points.
    """
    runs = [r for r in results if r.requests and r.distribution]
    if not runs:
        return float("nan")
    total = sum(r.requests for r in runs)
    low = min(r.distribution[0][1] for r in runs)
    high = max(r.distribution[-1][1] for r in runs)
    target = percentile / 100 * total
    # Bisection on the pooled cumulative distribution, to well under wrk's 1 us resolution.
    for _ in range(50):
        middle = (low + high) / 2
        if sum(r.requests * r.fraction_within(middle) for r in runs) >= target:
            high = middle
        else:
            low = middle
    return high


_LINE = re.compile(r"^WRK (\d+) ([0-9.]+) (\d+) (\d+) ([0-9.]+) ([0-9.]+)$", re.M)
_GRID = re.compile(r"^WRKGRID (.+)$", re.M)


def wrk(
    url: str, script: str, *, connections: int, seconds: float, pinned: bool = True
) -> WrkResult:
    """Run wrk with one thread (on the load core when ``pinned``) and return its figures."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(script)
        lua.flush()
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", lua.name]
        if pinned:
            argv = ["taskset", "-c", LOAD_CPU, *argv]
        out = subprocess.run([*argv, url], check=True, capture_output=True, text=True).stdout
    match = _LINE.search(out)
    if match is None:
        raise RuntimeError(f"wrk printed no result: {out[-2000:]}")
    requests, secs, status, errors, p50, p99 = match.groups()
    # wrk's status errors are the >= 400 answers; its summary line counts every non-2xx.
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    bad = int(non_2xx.group(1)) if non_2xx else 0
    grid = _GRID.search(out)
    distribution = tuple(
        (float(p), float(us) / 1000)
        for p, us in (point.split(":") for point in (grid.group(1).split() if grid else ()))
    )
    return WrkResult(
        int(requests),
        float(secs),
        max(bad, int(status)),
        int(errors),
        float(p50) / 1000,
        float(p99) / 1000,
        distribution,
    )


def under_callgrind(argv: list[str], folder: Path) -> list[str]:
    """``argv`` run under callgrind, its dumps written to ``folder``."""
    return [
        "valgrind",
        "--tool=callgrind",
        "-q",
        f"--callgrind-out-file={folder}/callgrind.%p",
        *argv,
    ]


def zero_instructions(pid: int) -> None:
    """Reset a callgrind process's counters (after its start-up and warm-up)."""
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)


def instructions_since_zero(pid: int, folder: Path) -> int:
    """Dump a callgrind process's counters and return the instructions counted since zero."""
    before = set(folder.glob(f"callgrind.{pid}*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for dump in set(folder.glob(f"callgrind.{pid}*")) - before:
            match = re.search(r"^(?:summary|totals): (\d+)", dump.read_text(), re.M)
            if match:
                return int(match.group(1))
        time.sleep(0.2)
    raise RuntimeError("callgrind wrote no dump")
