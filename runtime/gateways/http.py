"""The uvicorn side of `item serve`: what one HTTP server needs for a gateway's traffic.

Connections, not requests: a lingering close, a deadline for request heads, Connection: close
while draining, and a drain begun by the signal before uvicorn's own shutdown. The request
handling itself is gateway.py's, for any host.
"""

from __future__ import annotations

import json

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


class CloseWhileDraining:
    """ASGI middleware: from SIGTERM on, every answer says Connection: close, so a kept-alive
    client sends its next request elsewhere instead of into a connection that is closing
    (uvicorn closes it after the answer without saying so)."""

    def __init__(self, app, draining):
        self.app, self.draining = app, draining

    async def __call__(self, scope, receive, send):
        async def send_closing(message):
            if message["type"] == "http.response.start" and self.draining():
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_closing if scope["type"] == "http" else send)


class DrainingServer(uvicorn.Server):
    """uvicorn's server that calls `on_exit` (the gateway's drain) on SIGTERM / SIGINT, before
    its own shutdown stops accepting and waits for the admitted requests."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)


LINGER_S = 2.0  # how long a closing connection still reads (and drops) what its client sends


class LingeringTransport:
    """A transport whose close() lets the answer arrive. Closing a socket with unread bytes
    in it sends a TCP reset, and a reset can destroy an answer the client has not read yet.
    uvicorn closes as soon as it has answered, and the early answers (401, 413, 415, 429, 503,
    its own 400) come before the body has been read. So close() sends FIN once the answer is
    flushed, drops whatever still comes, and closes when the client does, or after LINGER_S.
    Found by fuzzing: a client sending a body with `Connection: close` sometimes got a reset
    in place of its answer."""

    def __init__(self, transport, loop):
        self._transport, self._loop = transport, loop
        self.lingering = False

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.is_closing():
            return
        self.lingering = True
        try:
            self._transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):  # already broken: nothing to wait for
            self._transport.close()
            return
        self._transport.resume_reading()  # flow control may have paused it: keep draining
        self._loop.call_later(LINGER_S, self._transport.close)


def gateway_protocol(timeout_s: float, on_timeout):
    """uvicorn's h11 protocol with three repairs for traffic a gateway meets.

    A lingering close (LingeringTransport above).

    A deadline for each request's line and headers. uvicorn has none: a client that connects and
    sends nothing, or trickles its headers a byte at a time, keeps its connection (a file
    descriptor) for ever, and enough of them leave the server unable to accept anyone. The
    deadline is armed when a connection opens and after each response (the next request on a
    kept-alive connection), and it fires only if no request has begun since and none is
    running, so a request being answered is never cut. A kept-alive connection that stays
    silent is left to uvicorn's keep-alive timeout, which closes it quietly.

    A body that breaks HTTP's framing (bad chunked encoding, found by fuzzing) gets uvicorn's own
    400 while the app may already be answering from the headers alone (a 415, say). The app's
    answer then went to a connection h11 had finished with, and each one logged a
    LocalProtocolError traceback. The request is now marked disconnected, as when a client goes
    away, so the app's answer is dropped quietly."""
    body = json.dumps({"error": "header_timeout",
                       "message": f"request line and headers not received within {timeout_s:g} s"}).encode()
    answer = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
              b"content-length: %d\r\n\r\n" % len(body)) + body

    class GatewayProtocol(H11Protocol):
        _deadline = None
        _heard = False  # bytes since the deadline was armed

        def data_received(self, data: bytes) -> None:
            if self.transport.lingering:
                return  # answered and closing: the rest of the body is dropped
            self._heard = True
            super().data_received(data)

        def connection_made(self, transport) -> None:
            super().connection_made(LingeringTransport(transport, self.loop))
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def send_400_response(self, msg: str) -> None:
            super().send_400_response(msg)
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True

        def connection_lost(self, exc) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._heard = False
            if not self.transport.is_closing():
                self._deadline = self.loop.call_later(timeout_s, self._expire, self.cycle)

        def _expire(self, cycle) -> None:
            if self.cycle is not cycle or self.transport.is_closing():
                return  # a request began since
            if cycle is None or (cycle.response_complete and self._heard):
                on_timeout()
                self.transport.write(answer)  # h11 cannot answer a request it has not parsed
                self.transport.close()

    return GatewayProtocol
