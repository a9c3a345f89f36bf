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
from pathlib import Path

__all__ = [
    "WrkResult",
    "can_count_instructions",
    "can_pin",
    "instructions_since_zero",
    "lua_script",
    "pin",
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


def pin(pid: int) -> None:
    """Pin every thread of ``pid`` (and the threads it starts later) to the server core."""
    subprocess.run(
        ["taskset", "-a", "-cp", SERVER_CPU, str(pid)], check=True, stdout=subprocess.DEVNULL
    )


def thread_cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User+system CPU seconds of a process (all threads), or of one of its threads."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def lua_script(path: str, headers: dict[str, str], template: str, prefix: str) -> str:
    """A wrk script POSTing ``template`` % (prefix, n) with a fresh n per request.

    ``done`` prints one machine-readable line: requests, seconds, non-2xx answers, socket
    errors, p50 and p99 in microseconds.
    """
    header_lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    body = template.replace('"', '\\"')
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

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


_LINE = re.compile(r"^WRK (\d+) ([0-9.]+) (\d+) (\d+) ([0-9.]+) ([0-9.]+)$", re.M)


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
    return WrkResult(
        int(requests),
        float(secs),
        max(bad, int(status)),
        int(errors),
        float(p50) / 1000,
        float(p99) / 1000,
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
