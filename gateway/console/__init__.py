"""The browser console: server-rendered pages over the reporting API, served at ``/console``.

People sign in with an API key once per browser session; the console keeps a random session
id in an ``HttpOnly``, ``SameSite=Strict`` cookie and the key's digest on the server, never
the key. Pages show what the JSON API answers (:mod:`gateway.http.reporting`), scoped to the
key's accounts, under a strict Content-Security-Policy (no inline script or style).
"""

from __future__ import annotations

from gateway.console.guard import security_headers
from gateway.console.setup import CONSOLE_PATH, setup_console

__all__ = ["CONSOLE_PATH", "security_headers", "setup_console"]
