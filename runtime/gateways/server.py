"""`item serve`: the gateway (gateway.py) under uvicorn (http.py), for upload gateways.

The endpoints and their answers are gateway.py's. This module wires them into a Starlette
app and runs it. On SIGTERM the gateway drains (/readyz 503, Connection: close), uvicorn stops
accepting, the admitted requests are answered, then it exits.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import asynccontextmanager

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware

from .config import ServeConfig
from .gateway import Gateway
from .http import CloseWhileDraining, DrainingServer, gateway_protocol


def create_app(gateway: Gateway) -> Starlette:
    @asynccontextmanager
    async def lifespan(app):
        await gateway.start()
        try:
            yield
        finally:
            answered = await gateway.stop()
            # The server's own account at exit: a connection it closed before any request reached
            # a handler (uvicorn's shutdown, the listen backlog) is not here, every request taken is.
            print(f"item serve: stopped; answered detect requests by status {json.dumps(answered)}",
                  file=sys.stderr, flush=True)

    return Starlette(routes=gateway.routes(), lifespan=lifespan,
                     middleware=[Middleware(CloseWhileDraining, draining=lambda: gateway.draining)])


def serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    gateway = Gateway(cfg)
    protocol = gateway_protocol(cfg.header_timeout_s, gateway.metrics.errors.labels("header_timeout").inc)
    # Grace: the longest a request admitted before the signal can take (its upload, then its
    # deadline), so that no answer a client waits for is cut.
    grace = math.ceil(cfg.upload_timeout_s + cfg.timeout_s) + 5
    config = uvicorn.Config(create_app(gateway), host=host, port=port, log_level=log_level, http=protocol,
                            timeout_graceful_shutdown=grace)
    DrainingServer(config, on_exit=gateway.drain).run()
