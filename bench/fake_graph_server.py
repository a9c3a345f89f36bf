"""A minimal Graph API stand-in for benchmarks: count the events, answer like Meta."""

from __future__ import annotations

import sys

import msgspec
from aiohttp import web

_decode = msgspec.json.Decoder(dict[str, list[object] | str]).decode


RECEIVED = web.AppKey("received", list)


async def events(request: web.Request) -> web.Response:
    body = _decode(await request.read())
    count = len(body["data"])
    request.app[RECEIVED][0] += count
    return web.json_response({"events_received": count, "messages": [], "fbtrace_id": "bench"})


async def stats(request: web.Request) -> web.Response:
    """How many events this fake has received so far."""
    return web.json_response({"received": request.app[RECEIVED][0]})


def main() -> None:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[RECEIVED] = [0]
    app.router.add_post("/{version}/{dataset_id}/events", events)
    app.router.add_get("/stats", stats)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
