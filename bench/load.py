"""A bounded, loopback-only HTTP load generator and the server processes it measures."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """Return the user+system CPU time a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def server(
    argv: list[str], port: int, env: dict[str, str], log: Path, *, start_timeout: float = 30
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server subprocess until the block ends; wait until it accepts connections."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + start_timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not start")
                time.sleep(0.05)
            yield proc
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@dataclass
class Result:
    requests: int
    errors: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        return statistics.quantiles(self.latencies, n=100)[int(p) - 1] * 1000


async def _drive(
    url: str,
    body: Callable[[int], bytes],
    headers: dict[str, str],
    *,
    seconds: float,
    concurrency: int,
    ok: tuple[int, ...],
) -> Result:
    counter = 0
    errors = 0
    latencies: list[float] = []
    stop_at = 0.0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal counter, errors
        while time.perf_counter() < stop_at:
            counter += 1
            started = time.perf_counter()
            async with session.post(url, data=body(counter), headers=headers) as resp:
                await resp.read()
                if resp.status not in ok:
                    errors += 1
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Warm up connections and caches; not counted.
        stop_at = time.perf_counter() + 1.0
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        latencies.clear()
        counter_before, errors = counter, 0
        begun = time.perf_counter()
        stop_at = begun + seconds
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - begun
    return Result(counter - counter_before, errors, elapsed, latencies)


def drive(url: str, body: Callable[[int], bytes], headers: dict[str, str], **kw: Any) -> Result:
    """Send POSTs from ``concurrency`` connections for ``seconds``; return the counts."""
    return asyncio.run(_drive(url, body, headers, **kw))


def python() -> str:
    return sys.executable
