"""What an operator installs: the systemd unit, and the shipped config with the demo secrets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="no systemd-analyze here")
def test_the_systemd_unit_verifies_without_a_warning(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    unit = (ROOT / "deploy" / "ctwa-gateway.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit  # SIGHUP reloads the secrets
    # verify wants an executable that exists: point ExecStart at this interpreter.
    unit = unit.replace("/opt/ctwa-gateway/.venv/bin/ctwa-gateway", sys.executable)
    path = tmp_path / "ctwa-gateway.service"
    path.write_text(unit)
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(path)], capture_output=True, text=True, check=False
    )
    assert (done.returncode, done.stderr) == (0, "")


def test_the_shipped_config_passes_the_checks_serve_runs(tmp_path: Path) -> None:
    # The variables scripts/dev serve makes up when they are not set.
    demo = {
        name: f"demo-{name.lower()}-0123456789abcdef"
        for name in ("CTWA_DEMO_API_KEY", "CTWA_APP_SECRET", "CTWA_WEBHOOK_VERIFY_TOKEN",
                     "CTWA_METRICS_KEY")
    }  # fmt: skip
    script = (ROOT / "scripts" / "dev").read_text()
    assert all(name in script for name in demo)
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(ROOT / "config.toml")],
        capture_output=True, text=True, env={**os.environ, **demo}, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.endswith("ok\n")
