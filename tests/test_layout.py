"""The architecture the tree promises: plugins use the public API only, the core is pure."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gateway

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_FILES = sorted(
    [*(ROOT / "plugins").rglob("*.py"), *(ROOT / "examples").rglob("*.py")],
    key=str,
)
# Decoding, identity rules, records, hashing, validation, configuration: no HTTP, no SQL.
PURE = [
    "gateway/capture/conversation_index.py",
    "gateway/capture/extract.py",
    "gateway/capture/identities.py",
    "gateway/capture/payload.py",
    "gateway/capture/records.py",
    "gateway/capture/values.py",
    "gateway/config.py",
    "gateway/domain.py",
    "gateway/draft.py",
    "gateway/hashing.py",
    "gateway/phones.py",
    "gateway/reports.py",
    "gateway/validation.py",
]


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_import_only_the_public_api(path: Path) -> None:
    internal = [m for m in imported_modules(path) if m.startswith("gateway.")]
    assert internal == [], f"{path.name} imports gateway internals; add what it needs to gateway"


@pytest.mark.parametrize("name", PURE)
def test_the_core_is_free_of_http_and_sql(name: str) -> None:
    banned = ("aiohttp", "aiosqlite", "gateway.http", "gateway.store", "gateway.delivery")
    found = [m for m in imported_modules(ROOT / name) if m.startswith(banned)]
    assert found == []


def test_the_public_api_exports_what_it_lists() -> None:
    missing = [name for name in gateway.__all__ if not hasattr(gateway, name)]
    assert missing == []
    # What the built-ins need is there: the hashing helpers and the Store protocol.
    assert {"hash_email", "hash_phone", "hash_external_id", "Store", "SendOutcome"} <= set(
        gateway.__all__
    )
