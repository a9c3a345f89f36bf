"""``ctwa-gateway``: argv -> settings -> logging -> run.

Subcommands: ``serve`` (the HTTP gateway), ``send`` (run events through the pipeline without
HTTP; ``--dry-run`` writes nothing), ``replay`` (re-queue failed deliveries), ``webhooks list``
and ``webhooks reprocess`` (the notification archive) and ``check-config``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import socket
import sqlite3
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import msgspec
from aiohttp import web

from gateway.config import Settings, load_settings
from gateway.console import CONSOLE_PATH
from gateway.credentials import load_environ
from gateway.errors import ConfigError, GatewayError, UsageError
from gateway.http.app import create_app, startup_problems
from gateway.http.middlewares import error_body
from gateway.http.render import conversion_response, resolution_view
from gateway.logs import configure_logging
from gateway.operations import (
    backup_store,
    copy_command,
    erase_person,
    probe,
    prune_now,
    replay,
    restore_store,
    store_stats_command,
    webhooks,
)
from gateway.pipeline import Pipeline, check_normalizers
from gateway.plugin_manager import Plugins, build_plugins
from gateway.runtime import new_event_loop, running
from gateway.store.engines import describe
from gateway.store.failures import unavailable_reason, withheld
from gateway.validation import decode_conversion
from gateway.wire import printable
from plugins.meta_capi.body import DEFAULT_PARTNER_AGENT, meta_request_body

__all__ = ["main"]

_encode = msgspec.json.Encoder().encode


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default="config.toml", help="config file (default: %(default)s)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctwa-gateway",
        description="Capture Click-to-WhatsApp click ids and report conversions to Meta.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP gateway")
    _add_config(serve)
    serve.add_argument("--host", help="override [server] host")
    serve.add_argument("--port", type=_port, help="override [server] port")

    send = sub.add_parser("send", help="run events through the pipeline without HTTP")
    _add_config(send)
    send.add_argument(
        "--dry-run",
        action="store_true",
        help="store and send nothing; print each event's outcome and exact Meta payload",
    )
    send.add_argument("events", help="a JSON file (one object, or JSON lines), or - for stdin")

    replay = sub.add_parser(
        "replay",
        help="re-queue failed (or expired) deliveries after a fix; delivered ones never",
        description="Make matching deliveries pending again so the running gateway sends them"
        " (within seconds). Use after fixing a token or dataset. Delivered events are never"
        " re-sent; events older than Meta's 7 days will expire again.",
    )
    _add_config(replay)
    replay.add_argument("--account", required=True, help="account id from [[accounts]]")
    replay.add_argument(
        "--status",
        action="append",
        choices=["failed", "expired"],
        help="which deliveries to re-queue (repeatable; default: failed)",
    )
    replay.add_argument(
        "--since",
        type=_since,
        default=0.0,
        help="only events received at or after this time (ISO 8601, or Unix seconds)",
    )
    replay.add_argument("--sink", action="append", help="only these sinks (default: all)")

    webhooks = sub.add_parser(
        "webhooks",
        help="the archive of signed notifications: list what was not processed, reprocess it",
    )
    actions = webhooks.add_subparsers(dest="action", required=True)
    listing = actions.add_parser(
        "list", help="archived notifications with unprocessed parts (or pending), and why"
    )
    reprocess_cmd = actions.add_parser(
        "reprocess",
        help="process archived notifications again (after an upgrade or a config change)",
        description="Re-run the unprocessed parts of archived notifications, and pending ones"
        " whole. Idempotent: a message already captured is not captured twice, a click id"
        " already set is not overwritten. Safe while the gateway runs.",
    )
    for command in (listing, reprocess_cmd):
        _add_config(command)
        command.add_argument("--account", help="only parts of this account (id from [[accounts]])")
        command.add_argument(
            "--since",
            type=_since,
            default=0.0,
            help="only notifications received at or after this time (ISO 8601, or Unix seconds)",
        )
    listing.add_argument(
        "--limit", type=_positive, default=50, help="at most this many (default 50)"
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per line")

    probe = sub.add_parser(
        "probe-event-names",
        help="ask Meta which event names it takes for business messaging (test events only)",
        description="Send one test event per candidate name to Meta, with a test event code and"
        " a real conversation's click id; record nothing; print what Meta said of each and the"
        " [events] allowed_names line to paste. Default candidates: the 14 names of Meta's FAQ"
        " and the configured ones.",
    )
    _add_config(probe)
    probe.add_argument("--account", required=True, help="account id from [[accounts]]")
    probe.add_argument(
        "--conversation", required=True, help="a conversation id with a captured click id"
    )
    probe.add_argument(
        "--test-code",
        required=True,
        type=_identifier,
        help="a test event code from Events Manager > Test events",
    )
    probe.add_argument(
        "--names", nargs="+", type=_identifier, help="the names to try (default: see above)"
    )

    erase_cmd = sub.add_parser(
        "erase",
        help="erase one person from an account (a legal request); optionally suppress them",
        description="Delete every row that identifies the person (conversations, message ids,"
        " archived notifications' mentions, the hashed identifiers in stored events), cancel"
        " their pending deliveries, and record an audit entry without personal data.",
    )
    _add_config(erase_cmd)
    erase_cmd.add_argument("--account", required=True, help="account id from [[accounts]]")
    who = erase_cmd.add_mutually_exclusive_group(required=True)
    who.add_argument("--phone", help="the person's phone number, with its country code")
    who.add_argument("--bsuid", help="the person's business-scoped user id")
    who.add_argument("--conversation", help="one of the person's conversation ids")
    erase_cmd.add_argument(
        "--suppress",
        action="store_true",
        help="refuse their future messages and conversions ([privacy] suppression_key_env)",
    )

    backup_cmd = sub.add_parser(
        "backup", help="an online, consistent copy of the store (safe while the gateway runs)"
    )
    _add_config(backup_cmd)
    backup_cmd.add_argument("path", help="where to write the copy")
    restore_cmd = sub.add_parser(
        "restore", help="verify a backup and make it the store (the gateway must be stopped)"
    )
    _add_config(restore_cmd)
    restore_cmd.add_argument("path", help="a file written by `ctwa-gateway backup`")
    stats_cmd = sub.add_parser(
        "stats", help="what the store holds: rows, bytes and the oldest row of each table"
    )
    _add_config(stats_cmd)
    stats_cmd.add_argument(
        "--store", action="store_true", required=True, help="statistics of the store"
    )
    stats_cmd.add_argument("--json", action="store_true", help="one JSON object per table")

    prune_cmd = sub.add_parser(
        "prune",
        help="prune what is past its retention now (what serve does every [store]"
        " housekeeping_interval_s)",
    )
    _add_config(prune_cmd)

    store_cmd = sub.add_parser("store", help="move the store: copy it into another engine")
    store_actions = store_cmd.add_subparsers(dest="action", required=True)
    copy_cmd = store_actions.add_parser(
        "copy",
        help="copy every row into a new, empty store (SQLite to PostgreSQL, or back)",
        description="Copy conversations, events, deliveries, attempts, the webhook archive,"
        " datasets and the rest into an empty store, then check every table's count on both"
        " sides. Stop the gateway first. A location is sqlite:///path/to/file, a"
        " postgresql:// URL, or env:NAME for a URL held in that environment variable (keep a"
        " password off the command line).",
    )
    copy_cmd.add_argument("--from", dest="source", required=True, help="the store to copy")
    copy_cmd.add_argument("--to", dest="target", required=True, help="an empty store")

    check = sub.add_parser("check-config", help="validate a config file and print what it loads")
    _add_config(check)
    return parser


def main(argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    base = os.environ if environ is None else environ
    if args.command == "store":
        # Needs no config: both stores are named on the command line.
        configure_logging("warning", "console", cache=False)
        try:
            return asyncio.run(copy_command(args.source, args.target, base))
        except ConfigError as exc:
            print(f"ctwa-gateway: {exc}", file=sys.stderr)
            return 2
    try:
        settings = load_settings(args.config)
        # Only the long-running server caches its loggers; one-shot commands stay
        # reconfigurable (tests call main() many times in one process).
        serving = args.command == "serve"
        configure_logging(
            settings.logging.level, settings.logging.format, cache=serving, buffered=serving
        )
        env = load_environ(settings, base)  # after logging: it may warn about the file
        plugins = build_plugins(settings)
        if args.command == "serve":
            return _serve(
                settings, plugins, env, args.host, args.port, lambda: load_environ(settings, base)
            )
        if args.command == "send":
            return asyncio.run(_send(settings, plugins, env, args.events, dry_run=args.dry_run))
        if args.command == "replay":
            return asyncio.run(replay(settings, plugins, env, args))
        if args.command == "webhooks":
            return asyncio.run(webhooks(settings, plugins, env, args))
        if args.command == "probe-event-names":
            return asyncio.run(probe(settings, plugins, env, args))
        if args.command == "erase":
            return asyncio.run(erase_person(settings, plugins, env, args))
        if args.command == "backup":
            return backup_store(settings, args)
        if args.command == "restore":
            return restore_store(settings, args)
        if args.command == "stats":
            return store_stats_command(settings, args)
        if args.command == "prune":
            return asyncio.run(prune_now(settings, plugins, env))
        return _check_config(settings, plugins, env, sys.stdout)
    except ConfigError as exc:
        print(f"ctwa-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"ctwa-gateway: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Whoever read the output stopped (`stats --store | head`): not a failure to report.
        # Python would report it again flushing stdout at exit: that goes nowhere now.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        # Only what a wait or free space cures: any other store error (a constraint a
        # statement broke, a table it names that is not there) is a bug, raised as one.
        if unavailable_reason(exc) is None:
            shown = withheld(exc)
            if shown is exc:
                raise
            raise shown from None
        return _store_failed(exc)


def _store_failed(exc: Exception) -> int:
    """Say in one line that the store refused the work (a full disk, a lock held past its
    timeout, a database gone), as the API's 503 does; return the exit status."""
    # SQLite's messages are fixed texts ("database or disk is full"); a PostgreSQL error
    # may quote the row it refused, so only its kind is shown.
    reason = str(exc) if isinstance(exc, sqlite3.Error) else type(exc).__name__
    if getattr(exc, "sqlite_errorname", "") in {"SQLITE_CORRUPT", "SQLITE_NOTADB"}:
        print(
            f"ctwa-gateway: the store is damaged ({reason}): restore the latest backup"
            " (ctwa-gateway restore PATH; the damaged file is kept aside)",
            file=sys.stderr,
        )
        return 1
    # In the words /readyz uses (full, read-only, locked, unreachable...), which say what
    # to fix: "free space or wait for the lock" misled for a database that is not reachable.
    print(
        f"ctwa-gateway: the store cannot be written now: {unavailable_reason(exc) or reason}."
        " What it refused was not done; run the command again once that is fixed (safe to"
        " repeat)",
        file=sys.stderr,
    )
    return 1


def _serve(
    settings: Settings,
    plugins: Plugins,
    env: Mapping[str, str],
    host: str | None,
    port: int | None,
    reload_environ: Callable[[], Mapping[str, str]],
) -> int:
    host = host or settings.server.host
    port = settings.server.port if port is None else port
    # The address served is the one the startup checks judge (an open /metrics off loopback).
    server = msgspec.structs.replace(settings.server, host=host, port=port)
    settings = msgspec.structs.replace(settings, server=server)
    app = create_app(settings, plugins, environ=env, reload_environ=reload_environ)
    # Bind before anything starts: a port in use must not leave a second gateway running its
    # dispatcher (and sending) while it fails to serve.
    ipv6 = ":" in host
    try:
        sock = socket.create_server(
            (host, port),
            family=socket.AF_INET6 if ipv6 else socket.AF_INET,
            # "::" serves IPv4 too, as aiohttp's own binding did.
            dualstack_ipv6=host == "::" and socket.has_dualstack_ipv6(),
        )
    except OSError as exc:
        # A host that does not resolve carries a resolver code (negative), which
        # os.strerror renders as "Unknown error -2"; the resolver's own text names it.
        if exc.errno is not None and exc.errno < 0:
            reason = str(exc.strerror).split(" (while attempting", 1)[0]
        else:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
        print(f"ctwa-gateway: cannot listen on {host}:{port}: {reason}", file=sys.stderr)
        return 2
    # Until the loop's own handlers are in place: a reload must not kill us, and a stop is
    # kept and honoured once the app has started, as a clean shutdown (not death by signal).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stop = _EarlyStop()
    signal.signal(signal.SIGTERM, stop.note)
    app.on_startup.append(stop.replay)
    loop, kind = new_event_loop(settings.server.event_loop)
    shown = f"[{host}]" if ipv6 else host
    port = sock.getsockname()[1]  # port 0: the one the system chose, which is the one to call
    print(
        f"ctwa-gateway listening on http://{shown}:{port} ({kind} event loop)",
        file=sys.stderr,
        flush=True,
    )
    if settings.console.enabled:
        print(
            f"console: http://{shown}:{port}{CONSOLE_PATH}/ (sign in with an API key)",
            file=sys.stderr,
            flush=True,
        )
    # access_log=None: aiohttp's access log writes IPs, query strings and user agents; the
    # canonical request line replaces it.
    web.run_app(app, sock=sock, access_log=None, print=None, loop=loop)
    return 0


class _EarlyStop:
    """A SIGTERM that arrives between binding and the app's start, replayed once aiohttp's own
    handler (a graceful shutdown) is in place."""

    def __init__(self) -> None:
        self.requested = False

    def note(self, signum: int, frame: object) -> None:
        self.requested = True

    async def replay(self, app: web.Application) -> None:
        if self.requested:
            os.kill(os.getpid(), signal.SIGTERM)


# Where an event came from: ("line", n) for JSON lines and a single object, ("index", i) for
# the items of a JSON array.
Origin = tuple[str, int]


def _read_events(source: str) -> list[tuple[Origin, bytes]]:
    """Return the events of a file: one JSON object, a JSON array of objects, or JSON lines."""
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the events file {source}: {exc.strerror}") from None
    stripped = data.strip()
    if not stripped:
        raise UsageError(
            f"no events in {source}: send one JSON object, a JSON array of objects, or JSON"
            " lines (one object per line)"
        )
    try:
        value = msgspec.json.decode(stripped)
    except (msgspec.DecodeError, UnicodeDecodeError):
        # Not one JSON value: JSON lines, each judged (and reported) on its own.
        return [
            (("line", number), line)
            for number, line in enumerate(data.splitlines(), start=1)
            if line.strip()
        ]
    if isinstance(value, list):
        if not value:
            raise UsageError(f"no events in {source}: the array is empty")
        return [(("index", i), _encode(item)) for i, item in enumerate(value)]
    return [(("line", 1), stripped)]


def _error_line(origin: Origin, exc: GatewayError) -> dict[str, Any]:
    body = error_body(exc)
    return {origin[0]: origin[1], "status": "error", "httpStatus": exc.status, "error": body}


async def _send(
    settings: Settings, plugins: Plugins, env: Mapping[str, str], source: str, *, dry_run: bool
) -> int:
    check_normalizers(settings, plugins)
    # A dry run sends nothing: no sink's token or secret needs to be on this machine.
    plugins.check_config(settings, env, delivering=not dry_run)
    events = _read_events(source)
    failed = 0
    async with running(
        settings, plugins, env, start_plugins=not dry_run, create_store=not dry_run
    ) as pipeline:
        for origin, raw in events:
            try:
                line = await _send_one(pipeline, origin, raw, dry_run=dry_run)
            except GatewayError as exc:
                failed += 1
                line = _error_line(origin, exc)
            sys.stdout.write(_encode(line).decode() + "\n")
    return 1 if failed else 0


async def _send_one(
    pipeline: Pipeline, origin: Origin, raw: bytes, *, dry_run: bool
) -> dict[str, Any]:
    request = decode_conversion(raw)
    account = pipeline.account(request.account_id)
    if not dry_run:
        outcome = await pipeline.handle(request, account)
        return {origin[0]: origin[1], **msgspec.to_builtins(conversion_response(outcome))}
    existing = await pipeline.store.find_event(account.id, request.event_id)
    if existing is not None:
        pipeline.repeated(existing, request)  # a reused eventId with another body: its 409
    prepared = await pipeline.prepare(request, account)
    states = pipeline.plugins.accept(prepared)
    payload = next(
        (s.payload for s in states.values() if s.payload is not None),
        meta_request_body(
            [prepared.event],
            partner_agent=DEFAULT_PARTNER_AGENT,
            test_event_code=prepared.test_event_code,
        ),
    )
    return {
        origin[0]: origin[1],
        "status": "dry_run",
        "eventId": request.event_id,
        "conversationId": prepared.conversation.id,
        # A real send of this eventId would be answered from the stored event, not resent.
        "alreadyStored": existing is not None,
        "resolution": msgspec.to_builtins(resolution_view(prepared.resolution)),
        "payload": payload,
    }


_YEAR_10000 = 253_402_300_800


def _identifier(value: str) -> str:
    if not value.strip() or len(value) > 64 or not printable(value):
        raise argparse.ArgumentTypeError(
            f"{value!r}: 1 to 64 characters, no control or invisible ones"
        )
    return value


def _positive(value: str) -> int:
    # Bounded: SQLite's integers end at 2**63 - 1, and nobody lists more than a million.
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= _MOST:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number from 1 to {_MOST}")
    return int(value)


_MOST = 1_000_000


def _port(value: str) -> int:
    # As [server] port: out of range, the bind raised OverflowError, a traceback.
    if not (value.isascii() and value.isdigit()) or int(value) > _LAST_PORT:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port: a number from 0 to 65535")
    return int(value)


_LAST_PORT = 65535


def _since(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds) or not 0 <= seconds < _YEAR_10000:
            raise argparse.ArgumentTypeError(f"{value!r} is not a time: use a date or Unix seconds")
        return seconds
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither ISO 8601 (2026-11-24T10:00:00Z) nor Unix seconds"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _check_config(settings: Settings, plugins: Plugins, env: Mapping[str, str], out: TextIO) -> int:
    # The very checks `serve` runs before it starts, each reported.
    problems = startup_problems(settings, plugins, env)

    def present(name: str | None) -> str:
        if name is None:
            return "not configured"
        return f"${name} is {'set' if env.get(name) else 'NOT SET'}"

    w = out.write
    w(f"config: {settings.source}\n")
    w(
        f"server: http://{settings.server.host}:{settings.server.port}"
        f" (max body {settings.server.max_body_bytes} bytes)\n"
    )
    w(f"store: {describe(settings, env)}\n")
    w("accounts:\n")
    for account in settings.accounts:
        w(
            f"  - {account.id}: waba {account.waba_id}, phone number {account.phone_number_id},"
            f" dataset {account.dataset_id or '(none)'},"
            f" access token {present(account.access_token_env)}\n"
        )
    w("api keys:\n")
    for key in settings.auth.keys:
        w(f"  - {key.name}: {present(key.key_env)}, accounts {', '.join(key.accounts)}\n")
    w(
        f"webhook: app secret {present(settings.webhook.app_secret_env)},"
        f" verify token {present(settings.webhook.verify_token_env)},"
        + (
            f" archive on ({settings.webhook.archive_retention_days} days)\n"
            if settings.webhook.archive
            else " archive OFF\n"
        )
    )
    origins = plugins.origins()
    for role in ("resolvers", "normalizers", "sinks"):
        w(f"{role}:\n")
        for name in plugins.roles[role]:
            w(f"  - {name} ({origins[name]})\n")
    w(f"event names: {', '.join(settings.events.allowed_names)}\n")
    if problems:
        for problem in problems:
            w(f"problem: {problem}\n")
        return 1
    w("ok\n")
    return 0
