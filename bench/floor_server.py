"""The issue's prototype, the floor of this stack: what accepting a conversion durably costs
with nothing but aiohttp, msgspec, SHA-256 and SQLite.

It runs on uvloop, as the gateway does. It checks the bearer key, decodes the body into a
typed struct, hashes the phone, and inserts one row (``UNIQUE(account, event_id)``) through a
group commit on a writer thread with ``synchronous = FULL``, answering after the commit. No
validation beyond the types, no resolution, no normalization rules, no log line, no metrics,
no sinks, no reports: everything the gateway does on top has to fit between this server's
speed and the goal.

    python -m bench.floor_server PORT STORE_PATH
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import sqlite3
import sys
from concurrent.futures import ThreadPoolExecutor

import msgspec
import uvloop
from aiohttp import web

from bench.target import KEY

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    pk INTEGER PRIMARY KEY,
    account_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    body BLOB NOT NULL,
    UNIQUE (account_id, event_id)
)
"""
_INSERT = "INSERT INTO events (account_id, event_id, body) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"
_AUTHORIZATION = f"Bearer {KEY}".encode()


class Conversion(msgspec.Struct, rename="camel"):
    account_id: str
    event_name: str
    event_id: str
    phone_e164: str | None = None
    value: float | None = None
    currency: str | None = None


class Answer(msgspec.Struct):
    id: str
    status: str


Row = tuple[str, str, bytes]


class GroupCommit:
    """Rows queue while a batch commits; the next batch takes them all, in one fsync."""

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.execute(_SCHEMA)
        self.thread = ThreadPoolExecutor(1)
        self.pending: list[tuple[Row, asyncio.Future[None]]] = []
        self.busy = False

    async def write(self, row: Row) -> None:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((row, future))
        if not self.busy:
            self.busy = True
            asyncio.get_running_loop().create_task(self._drain())
        await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self.pending:
            batch, self.pending = self.pending, []
            try:
                await loop.run_in_executor(self.thread, self._commit, [row for row, _ in batch])
            except Exception as exc:  # its requests fail; the next batch goes on
                for _, future in batch:
                    future.set_exception(exc)
            else:
                for _, future in batch:
                    future.set_result(None)
        self.busy = False

    def _commit(self, rows: list[Row]) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.executemany(_INSERT, rows)
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")


def make_app(store: GroupCommit) -> web.Application:
    decoder = msgspec.json.Decoder(Conversion)
    encoder = msgspec.json.Encoder()

    async def accept(request: web.Request) -> web.Response:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, _AUTHORIZATION):
            raise web.HTTPUnauthorized()
        conversion = decoder.decode(await request.read())
        digits = (conversion.phone_e164 or "").lstrip("+")
        hashed = hashlib.sha256(digits.encode()).hexdigest()
        row = encoder.encode(
            {"ph": hashed, "value": conversion.value, "currency": conversion.currency}
        )
        await store.write((conversion.account_id, conversion.event_id, row))
        answer = Answer(id=conversion.event_id, status="accepted")
        return web.Response(body=encoder.encode(answer), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/whatsapp/conversions", accept)
    return app


def main() -> None:
    port, path = int(sys.argv[1]), sys.argv[2]
    app = make_app(GroupCommit(path))
    # The gateway's loop (uvloop where installed), so the floor is the stack it runs on.
    loop = uvloop.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
