"""uvicorn's settings for the server, in one place (``run_server`` and the tests use the same ones).

Connections are bounded in number and in time, so slow or idle clients cannot hold the server's sockets:

- ``max_connections`` (uvicorn's ``limit_concurrency``): past it, new requests get 503;
- ``keep_alive_timeout_s``: an idle keep-alive connection is closed this long after its last answer;
- ``header_timeout_s``: a request's headers must be complete this long after the connection opens (or after
  the first byte of a later request on a kept-alive connection); otherwise the server answers 408 (if anything
  was sent) and closes it. uvicorn's h11 protocol has no such timeout, hence the subclass below;
- the body has its own deadline (``--request-timeout`` too), enforced by the middleware, which answers 408.

Stopping is ``shutdown``'s: uvicorn's signal handling is replaced by a drain of up to ``--shutdown-timeout``
seconds, and uvicorn's own shutdown (listening socket closed, connections closed) only begins once that drain
is over. By then every request has finished or been cut, so uvicorn's ``timeout_graceful_shutdown`` only bounds
the last bytes of cut answers and of probes (``/health``, ``/metrics``): it never cuts what the drain allows.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_TIMEOUT_BODY = json.dumps({"error": {"message": "the request headers did not arrive in time", "type": "timeout_error",
                                     "param": None, "code": "request_timeout"}}).encode()
_REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))
_AFTER_DRAIN_S = 5  # uvicorn's graceful shutdown, which starts after the drain (see above)


def uvicorn_config(app, host: str, port: int, log_level: str, settings):
    """The ``uvicorn.Config`` the server runs with (``settings``: a ``ServerSettings``)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, log_config=None, access_log=False,
                          timeout_graceful_shutdown=_AFTER_DRAIN_S, lifespan="off",
                          http=header_timeout_protocol(settings.request_timeout_s),
                          timeout_keep_alive=settings.keep_alive_timeout_s,
                          limit_concurrency=settings.max_connections)


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections whose request headers take longer than ``seconds``."""

    class HeaderTimeoutProtocol(H11Protocol):
        header_timeout_s = seconds

        def connection_made(self, transport) -> None:
            self._header_timer: asyncio.TimerHandle | None = None
            self._partial = False
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # still (or again) waiting for a request's headers
                self._partial = self._partial or bool(data)
                self._arm_header_timer()
            else:
                self._cancel_header_timer()

        def on_response_complete(self) -> None:
            self._partial = False
            super().on_response_complete()  # arms uvicorn's keep-alive timer for the idle connection

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return  # an answer is still being written (pipelined bytes wait their turn)
            if self._partial:  # half a request: say why before closing
                self.transport.write(_REQUEST_TIMEOUT)
            self.transport.close()

    return HeaderTimeoutProtocol
