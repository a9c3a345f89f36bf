"""The pure part of capture: paths, deep nesting, timestamps, without HTTP or SQLite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.capture.extract import extract
from gateway.capture.records import is_under
from gateway.capture.values import flatten_deep
from gateway.config import parse_settings
from tests.conftest import base_config
from tests.payloads import encode, message, messages_change, notification

NOW = 1_780_000_000.0


@pytest.mark.parametrize(
    ("body", "limit", "expected"),
    [
        (b"[[[[]]]]", 2, b"[[null]]"),
        (b'{"a":[[[1]]],"b":"[[[\\"]","c":[2]}', 2, b'{"a":[null],"b":"[[[\\"]","c":[2]}'),
        (b'{"s":"\\\\","t":[[[]]]}', 2, b'{"s":"\\\\","t":[null]}'),
        (b'{"a":{"b":{"c":{}}}}', 3, b'{"a":{"b":{"c":null}}}'),
        (b'{"flat":[1,2]}', 2, b'{"flat":[1,2]}'),
    ],
)
def test_flatten_deep_nulls_only_what_is_too_deep(body: bytes, limit: int, expected: bytes) -> None:
    assert flatten_deep(body, limit) == expected
    json.loads(expected)


@pytest.mark.parametrize(
    ("path", "ancestor", "under"),
    [
        ("$.entry[1].changes[0]", "$", True),
        ("$.entry[1].changes[0]", "$.entry[1]", True),
        ("$.entry[10].changes[0]", "$.entry[1]", False),
        ("$.entry[1]", "$.entry[1].changes[0]", False),
        ("$.entry[1]", "$.entry[1]", True),
    ],
)
def test_paths(path: str, ancestor: str, under: bool) -> None:
    assert is_under(path, ancestor) is under


def test_only_reprocesses_the_parts_named(tmp_path: Path) -> None:
    settings = parse_settings(base_config(tmp_path / "x.sqlite3"))
    msgs = [message(f"1650555000{i}", f"wamid.{i}", ts=NOW - 60) for i in range(3)]
    body = encode(notification(messages_change(msgs)))
    only = ["$.entry[0].changes[0].value.messages[1]"]
    batch = extract(body, settings, now=NOW, only=only)
    assert [m.wamid for m in batch.messages] == ["wamid.1"]
    assert [m.wamid for m in extract(body, settings, now=NOW).messages] == [
        "wamid.0",
        "wamid.1",
        "wamid.2",
    ]
