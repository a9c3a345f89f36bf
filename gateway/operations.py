"""The operator's commands: re-queue deliveries, the webhook archive, probing event names,
and the data lifecycle (erase, backup, restore, store stats).

Each opens the existing store (never creating one) and starts nothing in the background.
:mod:`gateway.cli` parses the arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import msgspec

from gateway.capture.inbox import reprocess
from gateway.config import Settings
from gateway.erasure import ErasureTarget, erase
from gateway.errors import ConfigError, GatewayError, UsageError
from gateway.http.query import ErasureQuery, convert_query
from gateway.http.render import iso_time
from gateway.plugin_manager import Plugins
from gateway.probe import FAQ_EVENT_NAMES, GraphSettings, probe_event_names
from gateway.runtime import housekeep, running
from gateway.store.backup import backup, carry_deliveries, erasures_after, restore, store_stats
from gateway.store.copy import copy_store
from gateway.store.engines import open_location
from gateway.wire import ErasureAnswer

__all__ = [
    "backup_store",
    "erase_person",
    "probe",
    "replay",
    "restore_store",
    "store_stats_command",
    "webhooks",
]

_encode = msgspec.json.Encoder().encode


async def replay(
    settings: Settings, plugins: Plugins, env: Mapping[str, str], args: argparse.Namespace
) -> int:
    if settings.account(args.account) is None:
        raise ConfigError(f"unknown account {args.account!r}; use an id from [[accounts]]")
    unknown = sorted(set(args.sink or []) - set(plugins.sink_names))
    if unknown:
        raise UsageError(
            f"unknown sink {unknown[0]!r}; the configured sinks are:"
            f" {', '.join(plugins.sink_names)}"
        )
    # Only a sink that sends through the outbox has anything to send again: a delivery made
    # pending for an immediate sink (log) would stay pending for ever.
    immediate = sorted(set(args.sink or []) - set(plugins.outbox_sinks))
    if immediate:
        raise UsageError(
            f"sink {immediate[0]!r} delivers at once and keeps no outbox: nothing to replay"
            f" (sinks with an outbox: {', '.join(plugins.outbox_sinks) or 'none'})"
        )
    sinks = args.sink or plugins.outbox_sinks
    if not sinks:
        # Not a mistake (a replay cron job on a log-only gateway): there is nothing to do.
        print(
            "nothing to replay: no configured sink keeps an outbox (the log sink delivers at once)"
        )
        return 0
    statuses = args.status or ["failed"]
    async with running(settings, plugins, env, start_plugins=False, create_store=False) as pipeline:
        count = await pipeline.store.outbox.requeue(
            args.account, sinks=sinks, statuses=statuses, since=args.since
        )
    print(
        f"re-queued {count} deliveries of account {args.account!r}"
        f" ({', '.join(statuses)}; sinks {', '.join(sinks)}); a running gateway sends them"
        " within seconds"
    )
    return 0


async def webhooks(
    settings: Settings, plugins: Plugins, env: Mapping[str, str], args: argparse.Namespace
) -> int:
    account = None
    if args.account is not None:
        account = settings.account(args.account)
        if account is None:
            raise ConfigError(f"unknown account {args.account!r}; use an id from [[accounts]]")
    async with running(settings, plugins, env, start_plugins=False, create_store=False) as pipeline:
        store = pipeline.store
        if args.action == "reprocess":
            report = await reprocess(store, settings, since=args.since, account=account)
            print(
                f"reprocessed {report.notifications} notifications: {report.processed} now fully"
                f" processed, {report.partial} still partial, {report.failed} failed"
                f" ({report.skipped} taken by another process); {report.messages} messages and"
                f" {report.clicks_captured} click ids captured"
            )
            return 1 if report.failed else 0
        accounts = None if account is None else [(account.id, account.phone_number_id)]
        found = await store.open_notifications(
            since=args.since, accounts=accounts, limit=args.limit
        )
    for notification in found:
        if args.json:
            print(_encode(notification).decode())
            continue
        print(
            f"#{notification.pk} {iso_time(notification.received_at)} {notification.status}"
            f" attempts={notification.attempts} request={notification.request_id or '-'}"
            + (f" error={notification.error}" if notification.error else "")
        )
        for problem in notification.problems:
            print(f"    {problem.path}  [{problem.code}]  {problem.reason}")
    if not found and not args.json:
        print("no archived notification has unprocessed parts")
    return 0


async def probe(
    settings: Settings, plugins: Plugins, env: Mapping[str, str], args: argparse.Namespace
) -> int:
    account = settings.account(args.account)
    if account is None:
        raise ConfigError(f"unknown account {args.account!r}; use an id from [[accounts]]")
    graph = GraphSettings.from_settings(settings)
    async with running(settings, plugins, env, start_plugins=False, create_store=False) as pipeline:
        conversation = await pipeline.store.get_conversation(account.id, args.conversation)
        stored = await pipeline.store.datasets()
    if conversation is None or not conversation.ctwa_clid:
        what = "has no captured click id" if conversation else "was not found"
        raise UsageError(
            f"conversation {args.conversation!r} {what} on account {account.id!r}: use one from"
            " GET /v1/whatsapp/conversations whose metadata has a ctwa_clid"
        )
    dataset = account.dataset_id or stored.get(account.id)
    if dataset is None:
        raise UsageError(
            f"account {account.id!r} has no dataset: set dataset_id, or create it with"
            " POST /v1/whatsapp/dataset"
        )
    names = list(dict.fromkeys(args.names or [*FAQ_EVENT_NAMES, *settings.events.allowed_names]))
    results = await probe_event_names(
        names, settings=settings, plugins=plugins, account=account, conversation=conversation,
        dataset_id=dataset, test_code=args.test_code, graph=graph, environ=env,
    )  # fmt: skip
    width = max(len("event name"), *(len(r.name) for r in results)) + 2
    print(f"{'event name':<{width}}{'Meta says':<11}detail")
    for r in results:
        print(f"{r.name:<{width}}{r.verdict:<11}{r.detail}".rstrip())
    accepted = [r.name for r in results if r.verdict == "accepted"]
    if accepted:
        print(f"\n# {graph.api_version}, {time.strftime('%Y-%m-%d')}: paste under [events]")
        print("allowed_names = [" + ", ".join(f'"{n}"' for n in accepted) + "]")
    else:
        print("\nMeta accepted no name: nothing to paste (see the details above).")
    return 1 if any(r.verdict == "error" for r in results) else 0


# The erasure API's parameters, as `erase` spells them.
_ERASE_FLAGS = {
    "phoneE164": "--phone",
    "businessScopedUserId": "--bsuid",
    "conversationId": "--conversation",
    "suppress": "--suppress",
}


async def erase_person(
    settings: Settings, plugins: Plugins, env: Mapping[str, str], args: argparse.Namespace
) -> int:
    """``ctwa-gateway erase``: erase one person; print the counts (never who)."""
    if settings.account(args.account) is None:
        raise ConfigError(f"unknown account {args.account!r}; use an id from [[accounts]]")
    try:
        # The API's rules for the same parameters: an empty or malformed identifier (an unset
        # shell variable) must not be recorded as an erasure done.
        given = {
            "accountId": args.account,
            "phoneE164": args.phone,
            "businessScopedUserId": args.bsuid,
            "conversationId": args.conversation,
        }
        query = convert_query({k: v for k, v in given.items() if v is not None}, ErasureQuery)
        target = ErasureTarget(
            args.account,
            phone=query.phone_e164,
            bsuid=query.business_scoped_user_id,
            conversation_id=query.conversation_id,
        )
        async with running(
            settings, plugins, env, start_plugins=False, create_store=False
        ) as pipeline:
            account = pipeline.account(args.account)
            erasure_id, counts, cleared = await erase(
                pipeline.store, account, target, actor="cli", suppress=args.suppress
            )
    except GatewayError as exc:
        # The API's words name its parameters; here the person was named with flags.
        message = exc.message
        for name, flag in _ERASE_FLAGS.items():
            message = message.replace(f"`{name}`", f"`{flag}`")
        raise UsageError(message) from None
    answer = ErasureAnswer(
        erasure_id=erasure_id, erased=counts, suppressed=args.suppress, file_cleared=cleared
    )
    print(_encode(answer).decode())
    return 0


def _sqlite_only(settings: Settings, instead: str) -> None:
    """Refuse a command about the SQLite file when the store is PostgreSQL."""
    if settings.uses_postgres():
        raise UsageError(f"the store is a PostgreSQL database: {instead}")


def backup_store(settings: Settings, args: argparse.Namespace) -> int:
    """``ctwa-gateway backup PATH``: an online, consistent copy of the store."""
    _sqlite_only(settings, "back it up with pg_dump")
    size = backup(settings.store_path(), Path(args.path))
    print(f"backed up {settings.store_path()} to {args.path} ({size} bytes)")
    return 0


def restore_store(settings: Settings, args: argparse.Namespace) -> int:
    """``ctwa-gateway restore PATH``: verify a backup, then make it the store."""
    _sqlite_only(settings, "restore it with pg_restore")
    store = settings.store_path()
    done = restore(Path(args.path), store)
    print(f"restored {args.path} (schema {done.version}) to {store}")
    if done.aside is not None:
        carried = carry_deliveries(done.aside, store)
        if carried is None:
            print(
                "warning: the store it replaced cannot be read, so the deliveries it made after"
                " this backup was taken are unknown: those still pending in the backup will be"
                " sent when the gateway starts, and Meta counts twice any it had received.",
                file=sys.stderr,
            )
        elif carried:
            sinks = ", ".join(f"{sink} {n}" for sink, n in sorted(carried.items()))
            print(
                f"{sum(carried.values())} deliveries still pending in the backup were made since"
                f" by the store it replaced ({sinks}): taken over from it, so they are not sent"
                " again (Meta would count them twice)"
            )
        later = erasures_after(done.aside, store)
        if later is None:
            print(
                "warning: the store it replaced cannot be read, so the erasures made after this"
                " backup was taken are unknown: the people they erased may be in the restored"
                " store again. Erase again everyone erased since the backup.",
                file=sys.stderr,
            )
        elif later:
            ids = ", ".join(f"#{pk} ({iso_time(at)}, {account})" for pk, at, account in later)
            print(
                f"warning: {len(later)} erasures were made after this backup was taken ({ids}):"
                " the people they erased are in the restored store again. Erase them again"
                " (the audit log keeps no identities to do it by).",
                file=sys.stderr,
            )
        print(
            f"the store it replaced is kept at {done.aside}: delete it once the restore is"
            " checked (it holds what was erased since the backup)"
        )
    return 0


async def prune_now(settings: Settings, plugins: Plugins, env: Mapping[str, str]) -> int:
    """``ctwa-gateway prune``: one housekeeping pass now; print what each rule removed."""
    async with running(settings, plugins, env, start_plugins=False, create_store=False) as pipeline:
        removed = await housekeep(pipeline.store, settings)
    print("pruned: " + ", ".join(f"{name} {count}" for name, count in removed.items()))
    return 0


def store_stats_command(settings: Settings, args: argparse.Namespace) -> int:
    """``ctwa-gateway stats --store``: rows, bytes and oldest row per table."""
    _sqlite_only(settings, "see its tables' sizes with psql's \\dt+")
    rows = store_stats(settings.store_path())
    if args.json:
        for row in rows:
            print(_encode(row).decode())
        return 0
    print(f"{'table':<24}{'rows':>10}{'bytes':>14}{'oldest (days)':>15}")
    for row in rows:
        size = "-" if row["bytes"] is None else str(row["bytes"])
        oldest = "-" if row["oldestDays"] is None else f"{row['oldestDays']:g}"
        print(f"{row['table']:<24}{row['rows']:>10}{size:>14}{oldest:>15}")
    return 0


async def copy_command(source: str, target: str, environ: Mapping[str, str]) -> int:
    """``ctwa-gateway store copy --from A --to B``: every row of A into the empty B, checked."""
    origin = await open_location(_location(source, environ), create=False)
    try:
        destination = await open_location(_location(target, environ), create=True)
        try:
            copied = await copy_store(
                origin, destination, progress=lambda table, rows: _progress(table, rows)
            )
        finally:
            await destination.close()
    finally:
        await origin.close()
    sys.stderr.write("\n")
    width = max(len(name) for name in copied)
    for name, rows in copied.items():
        print(f"{name:<{width}}  {rows:>10} rows")
    print(f"copied {sum(copied.values())} rows; every table's count matches")
    return 0


def _location(value: str, environ: Mapping[str, str]) -> str:
    """A store location as given, or the URL in the variable ``env:NAME`` names."""
    if not value.startswith("env:"):
        return value
    name = value.removeprefix("env:")
    found = environ.get(name)
    if not found:
        raise ConfigError(f"{value}: the variable {name} is not set")
    return found


def _progress(table: str, rows: int) -> None:
    sys.stderr.write(f"\r{table}: {rows} rows\x1b[K")
