"""The minimal aiohttp server benchmarks compare against: read the body, answer fixed JSON."""

from __future__ import annotations

import sys

from aiohttp import web

ANSWER = b'{"platform":"metaads","eventsReceived":1,"eventsFailed":0,"failures":[]}'


async def accept(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=ANSWER, content_type="application/json")


def main() -> None:
    app = web.Application()
    app.router.add_post("/v1/whatsapp/conversions", accept)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
