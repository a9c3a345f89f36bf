"""Durable accepted conversions per second on PostgreSQL, with one, two and three replicas,
next to one gateway on SQLite and the minimal aiohttp handler, all in the same run.

Everything shares the machine (on two cores: the load generator, the gateways and PostgreSQL
take turns), so throughput cannot grow with replicas here; what predicts scaling on a bigger
machine is the **CPU per accepted event**, the gateways' and PostgreSQL's, which this prints,
with PostgreSQL's **WAL flushes per accepted event** (one per write commit: group commit
carrying over shows as far below 1). The
PostgreSQL is a throwaway cluster from the pgserver wheel started durable (fsync and
synchronous commit on), or ``--postgres-url`` (an empty database the bench may fill).

    python -m bench.replicas [--seconds 5] [--connections 64]

Each request is bench.ingest's: a Purchase with value and currency by ``phoneE164`` of a
conversation captured through the signed webhook, with a fresh ``eventId``; load comes from
``wrk`` (one per replica, the connections split between them), else an aiohttp client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench.ingest import HEADERS, PATH, PHONE, TEMPLATE
from bench.load import cpu_seconds, drive, free_port, python, server
from bench.pinned import lua_script, wrk
from bench.target import ENV, capture, shipped_config
from tests.postgres import PostgresCluster, create_database, database_url


@dataclass
class Figures:
    name: str
    rate: float  # accepted events per second
    p99_ms: float
    errors: int
    cpu_ms: float  # gateway + PostgreSQL CPU per accepted event
    pg_cpu_ms: float
    flushes: float  # PostgreSQL WAL flushes (write commits) per accepted event


def _postgres_pids(cluster: PostgresCluster | None) -> list[int]:
    """The postmaster and its children (backends, WAL writer, checkpointer...)."""
    if cluster is None:
        return []
    root = cluster.process.pid
    pids = [root]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == root:
                    pids.append(int(entry.name))
    return pids


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


async def _wal_flushes(url: str | None) -> int:
    """PostgreSQL's WAL fsyncs so far: one per write transaction's commit (reads flush
    nothing), so their count per accepted event says how many events share a commit."""
    if url is None:
        return 0
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT wal_sync FROM pg_stat_wal"))
    finally:
        await conn.close()


def _bodies(prefix: str) -> Callable[[int], bytes]:
    return lambda n: (TEMPLATE % (prefix, n)).encode()


def _load(ports: list[int], seconds: float, connections: int, tag: str) -> tuple[int, float, int]:
    """Drive every port at once; return (2xx answers, worst p99 ms, errors)."""
    if shutil.which("wrk") is None:
        per = max(1, connections // len(ports))
        results = [
            drive(
                f"http://127.0.0.1:{port}{PATH}",
                _bodies(f"{tag}{port}"),
                HEADERS,
                seconds=seconds,
                concurrency=per,
                ok=(200, 202),
            )
            for port in ports
        ]
        return (
            sum(r.requests - r.errors for r in results),
            max(r.percentile(99) for r in results),
            sum(r.errors for r in results),
        )
    per = max(1, connections // len(ports))

    async def all_at_once() -> list[object]:
        return list(
            await asyncio.gather(
                *(
                    asyncio.to_thread(
                        wrk,
                        f"http://127.0.0.1:{port}",
                        lua_script(PATH, HEADERS, TEMPLATE, f"{tag}{port}-"),
                        connections=per,
                        seconds=seconds,
                        pinned=False,
                    )
                    for port in ports
                )
            )
        )

    found = asyncio.run(all_at_once())
    ok = sum(r.requests - r.non_2xx - r.socket_errors for r in found)  # type: ignore[attr-defined]
    errors = sum(r.non_2xx + r.socket_errors for r in found)  # type: ignore[attr-defined]
    return ok, max(r.p99_ms for r in found), errors  # type: ignore[attr-defined]


@contextlib.contextmanager
def _gateways(
    folder: Path, count: int, store: dict[str, object], tag: str
) -> Iterator[tuple[list[int], list[int]]]:
    ports = [free_port() for _ in range(count)]
    with contextlib.ExitStack() as stack:
        pids = []
        for port in ports:
            config = shipped_config(folder, port, store=store, logging={"level": "warning"})
            proc = stack.enter_context(
                server(
                    [python(), "-m", "gateway", "serve", "--config", str(config)],
                    port,
                    ENV,
                    folder / f"{tag}-{port}.log",
                )
            )
            pids.append(proc.pid)
        yield ports, pids


def _measure(
    name: str,
    folder: Path,
    count: int,
    store: dict[str, object],
    *,
    seconds: float,
    connections: int,
    cluster: PostgresCluster | None,
    url: str | None,
) -> Figures:
    with _gateways(folder, count, store, name) as (ports, pids):
        capture(ports[0], PHONE)
        _load(ports, 1.0, connections, f"warm-{name}-")  # connections, caches, plans
        pg = _postgres_pids(cluster)
        cpu_before, pg_before = _cpu(pids), _cpu(pg)
        commits_before = asyncio.run(_wal_flushes(url))
        accepted, p99, errors = _load(ports, seconds, connections, f"{name}-")
        cpu_after, pg_after = _cpu(pids), _cpu(_postgres_pids(cluster))
        commits = asyncio.run(_wal_flushes(url)) - commits_before
    per = max(accepted, 1)
    pg_cpu = max(0.0, pg_after - pg_before)
    return Figures(
        name=name,
        rate=accepted / seconds,
        p99_ms=p99,
        errors=errors,
        cpu_ms=(cpu_after - cpu_before + pg_cpu) * 1000 / per,
        pg_cpu_ms=pg_cpu * 1000 / per,
        flushes=commits / per,
    )


def _baseline(folder: Path, seconds: float, connections: int) -> Figures:
    port = free_port()
    argv = [python(), "-m", "bench.baseline_server", str(port)]
    with server(argv, port, {}, folder / "baseline.log") as proc:
        _load([port], 1.0, connections, "warm-base-")
        before = cpu_seconds(proc.pid)
        accepted, p99, errors = _load([port], seconds, connections, "base-")
        cpu = cpu_seconds(proc.pid) - before
    return Figures(
        "minimal aiohttp handler",
        accepted / seconds,
        p99,
        errors,
        cpu * 1000 / max(accepted, 1),
        0.0,
        0.0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--postgres-url", help="an empty database to use (default: a cluster)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ctwa-bench-") as tmp:
        folder = Path(tmp)
        cluster = None if args.postgres_url else PostgresCluster.start(durable=True)
        try:
            server_url = args.postgres_url or cluster.url  # type: ignore[union-attr]
            rows = [_baseline(folder, args.seconds, args.connections)]
            rows.append(
                _measure(
                    "gateway on SQLite",
                    folder,
                    1,
                    {"path": str(folder / "s.sqlite3")},
                    seconds=args.seconds,
                    connections=args.connections,
                    cluster=None,
                    url=None,
                )
            )
            for count in (1, 2, 3):
                url = server_url
                if cluster is not None:
                    url = database_url(server_url, asyncio.run(create_database(server_url)))
                name = f"{count} replica{'s' if count > 1 else ''} on PostgreSQL"
                rows.append(
                    _measure(
                        name,
                        folder,
                        count,
                        {"url": url},
                        seconds=args.seconds,
                        connections=args.connections,
                        cluster=cluster,
                        url=url,
                    )
                )
        finally:
            if cluster is not None:
                cluster.stop()
    base = rows[0].rate
    print(f"{os.cpu_count()} cores; {args.connections} connections; {args.seconds:g} s each")
    print(
        f"{'':<32}{'events/s':>10}{'x base':>8}{'p99 ms':>9}{'errors':>8}"
        f"{'CPU ms/ev':>11}{'of it PG':>10}{'flushes/ev':>12}"
    )
    for r in rows:
        print(
            f"{r.name:<32}{r.rate:>10.0f}{r.rate / base:>8.2f}{r.p99_ms:>9.1f}{r.errors:>8}"
            f"{r.cpu_ms:>11.3f}{r.pg_cpu_ms:>10.3f}{r.flushes:>12.3f}"
        )


if __name__ == "__main__":
    main()
