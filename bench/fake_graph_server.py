"""A minimal Graph API stand-in for benchmarks: count the events, answer like Meta."""

from __future__ import annotations

import sys

import msgspec
from aiohttp import web

_decode = msgspec.json.Decoder(dict[str, list[object] | str]).decode


async def events(request: web.Request) -> web.Response:
    body = _decode(await request.read())
    count = len(body["data"])
    return web.json_response({"events_received": count, "messages": [], "fbtrace_id": "bench"})


def main() -> None:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/{version}/{dataset_id}/events", events)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
