"""The Mailgun stand-in, a process of its own: aiohttp answering POST /v3/{domain}/messages.

    python -m bench.mailgun_standin [--port N]

Answers 200 {"id": "<n@x>"} to a request with the bench key (401 otherwise) and counts them.
Says `READY <port>`, then answers `count` on stdin until `quit` or the end of stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import base64

from aiohttp import web

from bench.control import answer_commands, say
from bench.workload import MAILGUN_KEY

_EXPECTED_AUTH = "Basic " + base64.b64encode(f"api:{MAILGUN_KEY}".encode()).decode()


class StandIn:
    """Counts accepted and refused requests."""

    def __init__(self) -> None:
        self.count = 0
        self.refused = 0

    async def messages(self, request: web.Request) -> web.Response:
        await request.read()
        if request.headers.get("Authorization") != _EXPECTED_AUTH:
            self.refused += 1
            return web.json_response({"message": "Forbidden"}, status=401)
        self.count += 1
        return web.json_response({"id": f"<{self.count}@x>", "message": "Queued. Thank you."})


async def serve(port: int) -> None:
    stand_in = StandIn()
    app = web.Application()
    app.router.add_post("/v3/{domain}/messages", stand_in.messages)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    host_port = runner.addresses[0]
    say("READY", host_port[1])
    try:
        await answer_commands(
            {"count": lambda: stand_in.count, "refused": lambda: stand_in.refused}
        )
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
