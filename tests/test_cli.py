"""The command line: send --dry-run, send, check-config, and python -m gateway."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import tomli_w

from gateway.cli import main
from gateway.config import load_settings
from gateway.errors import ConfigError
from gateway.http.app import create_app
from gateway.plugin_manager import build_plugins
from gateway.store.database import SqliteStore
from gateway.store.engines import open_store
from gateway.store.failures import StoreBug
from tests.conftest import ACME_TOKEN, API_KEY, CLID, ENV, WABA_ID, add_conversation, base_config


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    raw = base_config(tmp_path / "cli.sqlite3")
    path = tmp_path / "gateway.toml"
    path.write_bytes(tomli_w.dumps(raw).encode())
    return path


def seed(db: Path) -> str:
    async def run() -> str:
        store = await SqliteStore.open(db)
        try:
            return (await add_conversation(store)).id
        finally:
            await store.close()

    return asyncio.run(run())


def event(conversation_id: str, event_id: str = "e1", **extra: Any) -> dict[str, Any]:
    return {
        "accountId": "acme",
        "eventName": "Purchase",
        "eventId": event_id,
        "conversationId": conversation_id,
        "value": 10,
        "currency": "EUR",
        **extra,
    }


def output(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_dry_run_prints_payload_and_stores_nothing(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conversation_id = seed(tmp_path / "cli.sqlite3")
    events = tmp_path / "event.json"
    events.write_text(json.dumps(event(conversation_id)))

    code = main(["send", "--config", str(config_file), "--dry-run", str(events)], environ=ENV)

    (line,) = output(capsys)
    assert code == 0
    assert line["status"] == "dry_run"
    assert line["conversationId"] == conversation_id
    data = line["payload"]["data"][0]
    assert data["user_data"] == {"whatsapp_business_account_id": WABA_ID, "ctwa_clid": CLID}
    assert data["custom_data"] == {"currency": "EUR", "value": 10.0}
    assert line["alreadyStored"] is False

    async def count() -> int:
        store = await SqliteStore.open(tmp_path / "cli.sqlite3")
        try:
            return len(await store.recent_events("acme", 10))
        finally:
            await store.close()

    assert asyncio.run(count()) == 0


@pytest.mark.parametrize("sink", ["meta_capi", "test_mode"])
def test_a_dry_run_to_meta_needs_no_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sink: str
) -> None:
    # Found by review, helper C: `send --dry-run` with the Meta sink stopped at "environment
    # variable CTWA_ACME_TOKEN is not set", though a dry run sends nothing: previewing the
    # payload needed the production token on the machine.
    raw = base_config(tmp_path / "cli.sqlite3")
    raw["plugins"] = {
        "sinks": [sink],
        sink: {"graph_url": "http://127.0.0.1:9", "app_secret_env": "CTWA_META_APP_SECRET"},
    }
    if sink == "test_mode":
        raw["plugins"][sink]["test_event_code"] = "TEST123"
    config = tmp_path / "gateway.toml"
    config.write_bytes(tomli_w.dumps(raw).encode())
    conversation_id = seed(tmp_path / "cli.sqlite3")
    events = tmp_path / "event.json"
    events.write_text(json.dumps(event(conversation_id)))
    without = {k: v for k, v in ENV.items() if not k.endswith("_TOKEN")}

    code = main(["send", "--config", str(config), "--dry-run", str(events)], environ=without)

    said = capsys.readouterr()
    assert code == 0, said.err
    (line,) = [json.loads(text) for text in said.out.splitlines()]
    assert line["status"] == "dry_run"
    assert line["payload"]["data"][0]["user_data"]["ctwa_clid"] == CLID
    # A real send still asks for it, before anything is stored.
    code = main(["send", "--config", str(config), str(events)], environ=without)
    assert code == 2
    assert "CTWA_ACME_TOKEN is not set" in capsys.readouterr().err


def test_json_lines_report_each_event(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conversation_id = seed(tmp_path / "cli.sqlite3")
    events = tmp_path / "events.jsonl"
    events.write_text(
        "\n".join(
            [
                json.dumps(event(conversation_id, "a")),
                json.dumps(event(conversation_id, "b", eventName="Lead")),
                json.dumps(event("conv_nope", "c")),
            ]
        )
    )
    code = main(["send", "--config", str(config_file), "--dry-run", str(events)], environ=ENV)
    lines = output(capsys)
    assert code == 1
    assert [line["status"] for line in lines] == ["dry_run", "error", "error"]
    assert lines[1]["error"]["code"] == "invalid_event_name"
    assert lines[1]["line"] == 2
    assert lines[2]["httpStatus"] == 404


def test_send_without_dry_run_stores_and_dedupes(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conversation_id = seed(tmp_path / "cli.sqlite3")
    events = tmp_path / "event.json"
    events.write_text(json.dumps(event(conversation_id)))
    assert main(["send", "--config", str(config_file), str(events)], environ=ENV) == 0
    assert main(["send", "--config", str(config_file), str(events)], environ=ENV) == 0
    first, second = output(capsys)
    assert (first["duplicate"], second["duplicate"]) == (False, True)
    assert first["status"] == "dry_run"


def test_check_config_reports_secrets_without_values(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["check-config", "--config", str(config_file)], environ=ENV)
    out = capsys.readouterr().out
    assert code == 0
    assert "$CTWA_TEST_KEY is set" in out
    assert "$CTWA_ACME_TOKEN is set" in out
    assert ACME_TOKEN not in out
    assert "sinks:\n  - log (built-in plugins.log)" in out
    assert API_KEY not in out
    assert out.endswith("ok\n")


def test_check_config_fails_on_a_missing_key(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config", "--config", str(config_file)], environ={}) == 1
    assert "problem: API key 'admin'" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("environ", "problem"),
    [
        ({**ENV, "CTWA_TEST_KEY": "short-key"}, "shorter than 16 characters"),
        ({k: v for k, v in ENV.items() if k != "CTWA_SCOPED_KEY"}, "CTWA_SCOPED_KEY is not set"),
    ],
    ids=["short key", "missing second key"],
)
def test_check_config_refuses_what_serve_refuses(
    config_file: Path,
    capsys: pytest.CaptureFixture[str],
    environ: dict[str, str],
    problem: str,
) -> None:
    assert main(["check-config", "--config", str(config_file)], environ=environ) == 1
    assert problem in capsys.readouterr().out
    with pytest.raises(ConfigError, match=problem):
        create_app(load_settings(config_file), build_plugins(load_settings(config_file)),
                   environ=environ)  # fmt: skip


def test_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nport = 'x'\n")
    assert main(["check-config", "--config", str(path)], environ={}) == 2
    assert "$.server.port" in capsys.readouterr().err


def test_python_m_gateway_reads_stdin(config_file: Path, tmp_path: Path) -> None:
    conversation_id = seed(tmp_path / "cli.sqlite3")
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "send", "--config", str(config_file), "--dry-run", "-"],
        input=json.dumps(event(conversation_id)) + "\n",
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["payload"]["data"][0]["event_id"] == "e1"


def test_a_port_in_use_is_one_line_and_exit_2(config_file: Path, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config_file),
             "--port", str(port)],
            capture_output=True, text=True, env={**os.environ, **ENV}, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"ctwa-gateway: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    # Nothing started: the store was never opened.
    assert not (tmp_path / "cli.sqlite3").exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--port", "99999"], "argument --port: '99999' is not a port: a number from 0 to 65535"),
        (["--port", "-1"], "argument --port: '-1' is not a port: a number from 0 to 65535"),
        (
            ["--host", "no-such-host.invalid", "--port", "0"],
            "ctwa-gateway: cannot listen on no-such-host.invalid:0: ",
        ),
    ],
)
def test_an_address_that_cannot_be_served_is_one_line_and_exit_2(
    tmp_path: Path, flags: list[str], expected: str
) -> None:
    # A port out of range was a traceback (OverflowError from bind), and a host that does
    # not resolve said "Unknown error -2".
    raw = base_config(tmp_path / "cli.sqlite3")
    raw["metrics"] = {"public": True}  # a host off loopback passes startup's checks
    config_file = tmp_path / "gateway.toml"
    config_file.write_bytes(tomli_w.dumps(raw).encode())
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config_file), *flags],
        capture_output=True, text=True, env={**os.environ, **ENV}, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "Unknown error" not in done.stderr
    assert expected in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "cli.sqlite3").exists()


@pytest.mark.parametrize(
    ("fault", "raised"),
    [
        # A constraint the write broke, as a bug in a statement would.
        (
            "CREATE TRIGGER boom BEFORE INSERT ON erasures"
            " BEGIN SELECT RAISE(ABORT, 'injected fault'); END",
            sqlite3.IntegrityError,
        ),
        # A statement naming what is not there.
        ("DROP TABLE erasures", sqlite3.OperationalError),
    ],
)
def test_a_store_error_that_is_a_bug_is_not_called_unavailable(
    config_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fault: str,
    raised: type[Exception],
) -> None:
    # Found by review, helper C: every sqlite3.Error was "cannot be written now ... run the
    # command again", even one no wait or free space would cure. Only a full, read-only,
    # locked, failing or damaged store says so; anything else is raised, with its traceback.
    db = tmp_path / "cli.sqlite3"
    seed(db)
    with sqlite3.connect(db) as conn:
        conn.execute(fault)
    conn.close()
    with pytest.raises(raised):
        main(
            ["erase", "--config", str(config_file), "--account", "acme", "--phone", "+16505551234"],
            environ=ENV,
        )
    assert "cannot be written now" not in capsys.readouterr().err


def test_a_store_that_refuses_the_write_is_one_line_and_exit_1(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Found by review: a full disk or a store locked past its timeout made `erase` (and
    # send, replay, prune...) print two chained tracebacks; the API answers the same as a
    # 503 store_unavailable. Another process holds the write lock here.
    db = tmp_path / "cli.sqlite3"
    seed(db)
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        code = main(
            ["erase", "--config", str(config_file), "--account", "acme", "--phone", "+16505551234"],
            environ=ENV,
        )
    finally:
        holder.close()
    assert code == 1
    said = capsys.readouterr()
    assert said.out == ""
    assert said.err.splitlines() == [
        "ctwa-gateway: the store cannot be written now: the database is locked (another"
        " process holds it past the timeout). What it refused was not done; run the command"
        " again once that is fixed (safe to repeat)"
    ]
    # Nothing was erased: run again once the store is free, it is.
    assert (
        main(
            ["erase", "--config", str(config_file), "--account", "acme", "--phone", "+16505551234"],
            environ=ENV,
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["erased"]["conversations"] == 1


def test_erase_mistakes_name_the_flags_that_were_typed(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Found by review: `erase --phone +1` answered "Invalid `phoneE164`", the API's
    # parameter, which the operator never typed.
    seed(tmp_path / "cli.sqlite3")
    args = ["erase", "--config", str(config_file), "--account", "acme"]
    for flags, flag in (
        (["--phone", "+1"], "--phone"),
        (["--bsuid", "abc"], "--bsuid"),
        (["--conversation", ""], "--conversation"),
    ):
        assert main([*args, *flags], environ=ENV) == 2
        said = capsys.readouterr()
        assert said.out == ""
        (line,) = said.err.splitlines()
        assert f"`{flag}`" in line
        for name in ("phoneE164", "businessScopedUserId", "conversationId"):
            assert name not in line


def test_serve_on_port_0_says_the_port_it_got(config_file: Path) -> None:
    # Found by review: `--port 0` (or [server] port = 0) printed "listening on
    # http://127.0.0.1:0": the address to call was nowhere.
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config_file), "--port", "0"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV},
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        assert first.startswith("ctwa-gateway listening on http://127.0.0.1:"), first
        port = int(first.split("127.0.0.1:")[1].split()[0])
        assert port != 0
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    assert r.status == 200
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_output_cut_short_by_its_reader_is_no_traceback(config_file: Path, tmp_path: Path) -> None:
    # Found by review: `ctwa-gateway stats --store | head -1` (or `webhooks list | head`)
    # ended in a BrokenPipeError traceback.
    seed(tmp_path / "cli.sqlite3")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command writes a line
    try:
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "stats", "--store", "--config", str(config_file)],
            stdout=write, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV},
            timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(write)
    assert done.stderr == ""
    assert done.returncode == 1


def test_a_dry_run_on_a_mistyped_store_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = base_config(tmp_path / "typo" / "cli.sqlite3")
    path = tmp_path / "gateway.toml"
    path.write_bytes(tomli_w.dumps(raw).encode())
    events = tmp_path / "event.json"
    events.write_text(json.dumps(event("conv_x")))
    assert main(["send", "--config", str(path), "--dry-run", str(events)], environ=ENV) == 2
    assert "no store at" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize(
    ("content", "keys"),
    [
        # A pretty-printed object, an array, JSON lines: each event named by where it was.
        ('{\n  "accountId": "acme",\n  "eventName": "LeadSubmitted",\n  "eventId": "p1",\n'
         '  "conversationId": "CONV"\n}\n', [("line", 1)]),
        ('[{"accountId": "acme", "eventName": "LeadSubmitted", "eventId": "a1",'
         ' "conversationId": "CONV"}, {"eventName": "Purchase"}]', [("index", 0), ("index", 1)]),
        ('{"accountId": "acme", "eventName": "LeadSubmitted", "eventId": "l1",'
         ' "conversationId": "CONV"}\n\nnot json\n', [("line", 1), ("line", 3)]),
    ],
    ids=["pretty object", "array", "json lines"],
)  # fmt: skip
def test_send_reads_an_object_an_array_or_json_lines(
    config_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str,
    keys: list[tuple[str, int]],
) -> None:
    conversation_id = seed(tmp_path / "cli.sqlite3")
    events = tmp_path / "events.json"
    events.write_text(content.replace("CONV", conversation_id))
    code = main(["send", "--config", str(config_file), "--dry-run", str(events)], environ=ENV)
    lines = output(capsys)
    assert [(k, line[k]) for line, (k, _) in zip(lines, keys, strict=True)] == keys
    assert lines[0]["status"] == "dry_run"
    assert code == (1 if len(keys) > 1 else 0)
    if len(keys) > 1:
        assert lines[1]["status"] == "error"


def test_replay_with_no_outbox_sink_has_nothing_to_do_and_exits_0(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Found by review: it exited 2, a false alarm for a replay cron job on a log-only gateway.
    code = main(["replay", "--config", str(config_file), "--account", "acme"], environ=ENV)
    assert code == 0
    assert "nothing to replay: no configured sink keeps an outbox" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["send", "--dry-run", "missing.jsonl"], "cannot read the events file missing.jsonl"),
        (["send", "--dry-run", "EMPTY"], "no events in"),
        (["replay", "--account", "acme", "--sink", "bogus"], "unknown sink 'bogus'"),
        (["replay", "--account", "acme", "--sink", "log"], "'log' delivers at once"),
        (["replay", "--account", "acme", "--since", "nan"], "'nan' is not a time"),
        (["replay", "--account", "acme", "--since", "9" * 20], "is not a time"),
        (["send", "--dry-run", "EMPTY_ARRAY"], "the array is empty"),
    ],
    ids=[
        "missing file",
        "empty file",
        "unknown sink",
        "immediate sink",
        "nan time",
        "huge time",
        "empty array",
    ],
)
def test_command_line_mistakes_exit_2_with_one_line(
    config_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    seed(tmp_path / "cli.sqlite3")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    empty_array = tmp_path / "empty.json"
    empty_array.write_text("[]")
    files = {"EMPTY": str(empty), "EMPTY_ARRAY": str(empty_array)}
    argv = [files.get(a, a) for a in args] + ["--config", str(config_file)]
    with pytest.raises(SystemExit) if "--since" in args else contextlib.nullcontext():
        assert main(argv, environ=ENV) == 2
    assert message in capsys.readouterr().err


def test_a_dry_run_by_bsuid_shows_how_it_resolved(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def run() -> None:
        store = await SqliteStore.open(tmp_path / "cli.sqlite3")
        try:
            await add_conversation(store, bsuid="US.777", wa_id="16505550777")
        finally:
            await store.close()

    asyncio.run(run())
    events = tmp_path / "event.json"
    body = {**event("conv_x"), "businessScopedUserId": "US.777"}
    del body["conversationId"]
    events.write_text(json.dumps(body))
    assert main(["send", "--config", str(config_file), "--dry-run", str(events)], environ=ENV) == 0
    (line,) = output(capsys)
    assert line["resolution"] == {
        "resolver": "business_scoped_user_id", "field": "businessScopedUserId", "form": "as_sent"
    }  # fmt: skip
    assert line["payload"]["data"][0]["user_data"]["ctwa_clid"] == CLID


def test_a_store_path_that_cannot_be_a_store_is_refused_before_serving(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "a-folder"
    folder.mkdir()
    not_sqlite = tmp_path / "notes.txt"
    not_sqlite.write_text("hello")
    for store, problem in ((folder, "is a folder"), (not_sqlite, "is not an SQLite database")):
        path = tmp_path / "gateway.toml"
        path.write_bytes(tomli_w.dumps(base_config(store)).encode())
        assert main(["check-config", "--config", str(path)], environ=ENV) == 1
        assert problem in capsys.readouterr().out
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
            capture_output=True, text=True, env={**os.environ, **ENV}, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 2
        assert done.stderr.strip().splitlines() == [
            f"ctwa-gateway: configuration error: [store] path {store} {problem}"
            + ("; name a file in it" if store == folder else "")
        ]


def serve_until(args: list[str], healthz: str) -> str:
    """Run `ctwa-gateway serve ARGS` until ``healthz`` answers 200, stop it with SIGTERM;
    check it exited cleanly and return what it wrote to stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", *args],
        env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for _ in range(200):
            try:
                with urllib.request.urlopen(healthz, timeout=1) as answer:
                    assert answer.status == 200
                    break
            except OSError:
                time.sleep(0.05)
        else:
            raise AssertionError(proc.stderr.read() if proc.stderr else "no output")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return err


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 here")
def test_serve_listens_on_ipv6(config_file: Path) -> None:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6) as probe:
            port = probe.getsockname()[1]
    except OSError:
        pytest.skip("::1 cannot be bound here")
    err = serve_until(
        ["--config", str(config_file), "--host", "::1", "--port", str(port)],
        f"http://[::1]:{port}/healthz",
    )
    assert f"listening on http://[::1]:{port}" in err


def test_a_dry_run_shows_the_409_a_reused_event_id_would_get(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conversation_id = seed(tmp_path / "cli.sqlite3")
    events = tmp_path / "event.json"
    events.write_text(json.dumps(event(conversation_id)))
    assert main(["send", "--config", str(config_file), str(events)], environ=ENV) == 0
    capsys.readouterr()
    events.write_text(json.dumps(event(conversation_id, value=99)))
    assert main(["send", "--config", str(config_file), "--dry-run", str(events)], environ=ENV) == 1
    (line,) = output(capsys)
    assert (line["httpStatus"], line["error"]["code"]) == (409, "event_id_reused")


def test_probe_names_must_be_names(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["probe-event-names", "--config", str(config_file), "--account", "acme",
            "--conversation", "conv_x", "--test-code", "TEST1", "--names", ""]  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        main(argv, environ=ENV)
    assert exited.value.code == 2
    assert "no control or invisible" in capsys.readouterr().err


@pytest.mark.parametrize(("choice", "kind"), [("auto", "uvloop"), ("asyncio", "asyncio")])
def test_serve_runs_on_uvloop_unless_ruled_out(tmp_path: Path, choice: str, kind: str) -> None:
    raw = base_config(tmp_path / "cli.sqlite3")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    raw["server"] = {**raw.get("server", {}), "port": port, "event_loop": choice}
    config = tmp_path / "gateway.toml"
    config.write_bytes(tomli_w.dumps(raw).encode())
    # It serves on that loop, not only starts.
    err = serve_until(["--config", str(config)], f"http://127.0.0.1:{port}/healthz")
    assert f"listening on http://127.0.0.1:{port} ({kind} event loop)" in err


def test_sigterm_right_after_listening_is_a_clean_stop(config_file: Path) -> None:
    # The port is bound before the app starts (a second gateway must not run its dispatcher
    # if it cannot serve): a SIGTERM in between, a supervisor stopping it at once, exits 0.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config_file),
         "--port", str(port)],
        env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:
        if "listening on" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


async def test_a_postgresql_error_that_is_a_bug_does_not_quote_the_row(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Found by review (helper 38): since the CLI raises store errors that are bugs, a
    # PostgreSQL one printed its message and detail, which quote the row it refused: here
    # the phone being erased.
    raw = {**base_config(tmp_path / "unused.sqlite3"), "store": {"url": pg_url}}
    config = tmp_path / "gateway.toml"
    config.write_bytes(tomli_w.dumps(raw).encode())
    store = await open_store(load_settings(config), ENV)
    try:
        await add_conversation(store)
    finally:
        await store.close()
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(
            "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE"
            " EXCEPTION 'duplicate key value violates unique constraint'"
            " USING ERRCODE = 'unique_violation',"
            " DETAIL = 'Key (account_id, wa_id)=(acme, 16505551234) already exists.'; END $$;"
            " CREATE TRIGGER boom BEFORE INSERT ON erasures FOR EACH ROW EXECUTE FUNCTION boom()"
        )
    finally:
        await conn.close()
    argv = ["erase", "--config", str(config), "--account", "acme", "--phone", "+16505551234"]

    with pytest.raises(StoreBug) as raised:
        await asyncio.to_thread(main, argv, environ=ENV)

    # What Python prints for it: the traceback, and any exception it was raised from.
    shown = "".join(traceback.format_exception(raised.value)) + capsys.readouterr().err
    assert "UniqueViolationError (SQLSTATE 23505)" in shown
    assert "16505551234" not in shown
