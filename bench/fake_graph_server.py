"""A minimal Graph API stand-in for benchmarks: count the events, answer like Meta."""

from __future__ import annotations

import sys

import msgspec
from aiohttp import web


class _Event(msgspec.Struct):
    event_id: str


class _Body(msgspec.Struct):
    data: list[_Event]


_decode = msgspec.json.Decoder(_Body).decode


# Event ids seen, and how many arrived again: a gateway must never send one twice.
SEEN = web.AppKey("seen", set)
REPEATS = web.AppKey("repeats", list)


async def events(request: web.Request) -> web.Response:
    body = _decode(await request.read())
    seen = request.app[SEEN]
    for event in body.data:
        if event.event_id in seen:
            request.app[REPEATS][0] += 1
        seen.add(event.event_id)
    count = len(body.data)
    return web.json_response({"events_received": count, "messages": [], "fbtrace_id": "bench"})


async def stats(request: web.Request) -> web.Response:
    """How many distinct events this fake has received, and how many came twice."""
    return web.json_response(
        {"received": len(request.app[SEEN]), "repeats": request.app[REPEATS][0]}
    )


def main() -> None:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[SEEN] = set()
    app[REPEATS] = [0]
    app.router.add_post("/{version}/{dataset_id}/events", events)
    app.router.add_get("/stats", stats)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
