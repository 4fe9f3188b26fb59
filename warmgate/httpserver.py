"""A small HTTP/1.1 server: h11 parses, asyncio carries bytes.

Used by the simulator and by the probe server the kubelet talks to, so it stays small:
one request at a time per connection, limits on everything a client controls
(connections, header bytes, body bytes, time to send a request). One connection class,
an `asyncio.Protocol`, serves two kinds of handler:

- `start_server`: an async handler, run in a task per request; a body may be streamed
  (SSE) at the pace the client reads, and a client that leaves cancels the task. The
  simulator.
- `start_sync_server`: a plain function that answers from memory, called inside the
  protocol's `data_received`: no task, no await between parse and write. The probe
  server, whose answers must not wait behind a busy process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast

import h11

__all__ = [
    "Handler",
    "Request",
    "Response",
    "Server",
    "SyncHandler",
    "start_server",
    "start_sync_server",
]

log = logging.getLogger(__name__)

_RECV_BYTES = 65536
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
# How long a closing connection may take to flush its last bytes before we drop it.
_CLOSE_GRACE_S = 1.0


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: Mapping[str, str]  # names lower-cased; repeated headers joined with ", "
    body: bytes


@dataclass(slots=True)
class Response:
    """`body` as bytes gets a Content-Length; as an async iterator it is sent chunked,
    each chunk written and flushed as soon as the iterator yields it (SSE)."""

    status: int
    body: bytes | AsyncIterator[bytes] = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str | None = None

    @staticmethod
    def json(payload: Any, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> Response:
        body = json.dumps(payload, separators=(",", ":")).encode()
        return Response(status, body, list(headers), "application/json")

    @staticmethod
    def text(text: str, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> Response:
        return Response(status, text.encode(), list(headers), "text/plain; charset=utf-8")


Handler = Callable[[Request], Awaitable[Response]]
SyncHandler = Callable[[Request], Response]  # answers at once; its body must be bytes


@dataclass(frozen=True, slots=True)
class _Limits:
    max_connections: int
    max_header_bytes: int
    max_body_bytes: int
    header_timeout: float


class _RequestError(Exception):
    """The request cannot be served; answer `status` and close the connection."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class Server:
    """A listening server. `port` is the bound port (useful with port=0)."""

    def __init__(
        self, limits: _Limits, handler: Handler | None, answer: SyncHandler | None
    ) -> None:
        self._limits = limits
        self._handler = handler  # awaited in a task per request
        self._answer = answer  # called inside data_received
        self._listener: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._no_connections = asyncio.Event()
        self._no_connections.set()
        self.closing = False

    @property
    def host(self) -> str:
        return str(self._sockname()[0])

    @property
    def port(self) -> int:
        return int(self._sockname()[1])

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def close(self) -> None:
        """Stop accepting; close idle keep-alive connections; later responses say
        `Connection: close`. Requests in flight go on until their handlers finish."""
        self.closing = True
        if self._listener is not None:
            self._listener.close()
        for conn in list(self._connections):
            conn.close_if_idle()

    async def wait_closed(self) -> None:
        if self._listener is not None:
            await self._listener.wait_closed()

    async def wait_connections_closed(self) -> None:
        """Return once every accepted connection has gone (served or dropped)."""
        await self._no_connections.wait()

    async def _listen(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            lambda: _Connection(self), sock=sock, backlog=1024
        )

    def _admit(self, conn: _Connection, sock: socket.socket | None) -> bool:
        """Count a new connection in, or refuse it: closing, or over the cap."""
        if self.closing or len(self._connections) >= self._limits.max_connections:
            return False
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._connections.add(conn)
        self._no_connections.clear()
        return True

    def _gone(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        if not self._connections:
            self._no_connections.set()

    def _sockname(self) -> tuple[Any, ...]:
        if self._listener is None or not self._listener.sockets:
            raise RuntimeError("server is not listening")
        return tuple(self._listener.sockets[0].getsockname())


async def start_server(
    handler: Handler,
    host: str | None = None,
    port: int | None = None,
    *,
    sock: socket.socket | None = None,
    max_connections: int = 256,
    max_header_bytes: int = 16384,
    max_body_bytes: int = 8 << 20,
    header_timeout: float = 10.0,
) -> Server:
    """Listen on host:port (port 0 picks a free one; read it from `Server.port`), or on
    `sock`, a socket the caller bound already. `header_timeout` bounds the time to send a
    whole request (head and body); an idle keep-alive connection is closed after it."""
    limits = _Limits(max_connections, max_header_bytes, max_body_bytes, header_timeout)
    return await _serve(Server(limits, handler, None), _bound(host, port, sock))


async def start_sync_server(
    handler: SyncHandler,
    host: str | None = None,
    port: int | None = None,
    *,
    sock: socket.socket | None = None,
    max_connections: int = 256,
    max_header_bytes: int = 16384,
    max_body_bytes: int = 8 << 20,
    header_timeout: float = 10.0,
) -> Server:
    """As `start_server`, for a handler that answers at once from memory (no I/O, no
    streamed body): it runs inside the connection's `data_received`."""
    limits = _Limits(max_connections, max_header_bytes, max_body_bytes, header_timeout)
    return await _serve(Server(limits, None, handler), _bound(host, port, sock))


async def _serve(server: Server, sock: socket.socket) -> Server:
    await server._listen(sock)
    return server


def _bound(host: str | None, port: int | None, sock: socket.socket | None) -> socket.socket:
    """The caller's bound socket, or a new one listening on host:port (0: any free port)."""
    if sock is not None:
        return sock
    if port is None:
        raise ValueError("the server needs a port (0 for any free one) or a bound sock")
    return _listening_socket(host or "", port)


class _Connection(asyncio.Protocol):
    """One client connection. Requests are parsed inside `data_received`; a sync handler
    answers there and then (no task, no await: per request the loop only reads, and the
    probe server's answers never wait behind anything), an async handler in a task of its
    own while later requests wait in h11's buffer, so pipelined requests keep their order.
    The same limits and the same request building serve both."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._limits = server._limits
        self._handler = server._handler
        self._answer = server._answer
        self._h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self._limits.max_header_bytes
        )
        self._transport: asyncio.Transport | None = None  # None: refused or closed
        self._head: h11.Request | None = None
        self._body: list[bytes] = []
        self._body_size = 0
        self._idle = True  # waiting for a request head with no bytes of it received yet
        self._timer: asyncio.TimerHandle | None = None  # bounds the time to send a request
        self._task: asyncio.Task[None] | None = None  # an async handler answering
        self._pipelined = False  # bytes arrived while the task answers: reading waits
        self._write_paused = False  # the client's socket is full
        self._drained: asyncio.Future[None] | None = None  # a stream waiting for room

    def close_if_idle(self) -> None:
        if self._idle:
            self._close()

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = cast(asyncio.Transport, transport)  # uvloop's is one, not a subclass
        if not self._server._admit(self, tcp.get_extra_info("socket")):
            tcp.abort()  # over the cap a client learns at once
            return
        self._transport = tcp
        self._arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._close()  # the client left: a handler still answering (or streaming) stops
        self._server._gone(self)

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return
        self._h11.receive_data(data)
        if self._task is not None:
            # The next request waits for this answer, and reading waits with it: what a
            # client sends ahead cannot grow without bound.
            self._pipelined = True
            self._transport.pause_reading()
            return
        self._idle = False
        self._process()

    def eof_received(self) -> bool:
        if self._task is not None:
            self._close()  # the client left before its answer was made
        elif self._transport is not None:
            self._h11.receive_data(b"")
            self._process()
        return False  # let the transport close once our answer is flushed

    def pause_writing(self) -> None:
        # A client that does not read its answers is not read from either.
        self._write_paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None
        self._read_again()

    # -- requests --------------------------------------------------------------------------

    def _process(self) -> None:
        """Handle every complete event received so far, until an async handler's task
        holds the connection."""
        try:
            while self._transport is not None and self._task is None:
                event = self._h11.next_event()
                if event is h11.NEED_DATA:
                    return
                if isinstance(event, h11.Request):
                    _check_head(event, self._limits)
                    self._head = event
                    if self._h11.they_are_waiting_for_100_continue:
                        info = h11.InformationalResponse(status_code=100, headers=[])
                        self._transport.write(self._send(info))
                elif isinstance(event, h11.Data):
                    self._body_size += len(event.data)
                    if self._body_size > self._limits.max_body_bytes:
                        raise _RequestError(413, "request body too large")
                    self._body.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    self._respond(self._take_request())
                elif isinstance(event, h11.ConnectionClosed):
                    self._close()
                else:
                    raise _RequestError(400, f"unexpected {type(event).__name__}")
        except h11.RemoteProtocolError as exc:
            self._fail(exc.error_status_hint, str(exc))
        except _RequestError as exc:
            self._fail(exc.status, str(exc))
        except h11.LocalProtocolError:
            self._close(abort=True)  # the exchange is beyond repair

    def _take_request(self) -> Request:
        """The request whose head and body have arrived; the time to send it ends here."""
        assert self._head is not None
        head, body, self._head, self._body, self._body_size = self._head, self._body, None, [], 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        target = head.target.decode("latin-1")
        path, _, query = target.partition("?")
        method = head.method.decode("ascii")
        return Request(method, path, query, _headers(head.headers), b"".join(body))

    def _respond(self, request: Request) -> None:
        if self._answer is not None:
            try:
                response = self._answer(request)
                if not isinstance(response.body, bytes):
                    raise TypeError("a sync handler's response body must be bytes")
            except Exception:
                response = _handler_failed(request)
            assert isinstance(response.body, bytes)
            self._write_whole(request.method, response, response.body)
            self._next_cycle()
        elif self._handler is not None:
            self._task = asyncio.get_running_loop().create_task(
                self._respond_later(self._handler, request)
            )
            self._task.add_done_callback(self._responded)

    async def _respond_later(self, handler: Handler, request: Request) -> None:
        try:
            response = await handler(request)
        except Exception:
            response = _handler_failed(request)
        if isinstance(response.body, bytes):
            self._write_whole(request.method, response, response.body)
        else:
            await self._write_stream(request.method, response, response.body)

    def _responded(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if task.cancelled():
            self._close()
            return
        exc = task.exception()
        if exc is not None:
            if not isinstance(exc, ConnectionError):
                log.error("response failed; the connection is cut", exc_info=exc)
            # The head may be out, so a 500 is impossible; a cut connection tells the client.
            self._close(abort=True)
            return
        self._next_cycle()
        if self._h11.trailing_data[0]:  # a pipelined request, whole or in part
            self._idle = False
        self._pipelined = False
        self._read_again()
        self._process()

    def _next_cycle(self) -> None:
        h = self._h11
        if h.our_state is h11.DONE and h.their_state is h11.DONE and not self._server.closing:
            h.start_next_cycle()
            self._idle = True
            self._arm_timer()
        else:
            self._close()  # Connection: close, HTTP/1.0, or the server is closing

    def _timed_out(self) -> None:
        self._timer = None
        if self._idle:
            self._close()  # an idle keep-alive connection: close quietly
        else:
            self._fail(408, "request not received in time")

    def _fail(self, status: int, reason: str) -> None:
        if self._transport is not None:
            self._transport.write(_error_bytes(self._h11, status, reason))
        self._close()

    # -- writing ---------------------------------------------------------------------------

    def _write_whole(self, method: str, response: Response, body: bytes) -> None:
        out = self._send(_response_head(response, len(body), self._server.closing))
        if body and method != "HEAD":
            out += self._send(h11.Data(data=body))
        out += self._send(h11.EndOfMessage())
        self._write(out)

    async def _write_stream(
        self, method: str, response: Response, body: AsyncIterator[bytes]
    ) -> None:
        """Each chunk written as the iterator yields it, at the pace the client reads."""
        try:
            self._write(self._send(_response_head(response, None, self._server.closing)))
            if method != "HEAD":
                async for chunk in body:
                    if chunk:
                        self._write(self._send(h11.Data(data=chunk)))
                        await self._drain()
            self._write(self._send(h11.EndOfMessage()))
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()

    def _write(self, data: bytes) -> None:
        if self._transport is None:
            raise ConnectionResetError("the client went away")
        self._transport.write(data)

    async def _drain(self) -> None:
        if self._write_paused:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    def _send(self, event: h11.Event) -> bytes:
        return self._h11.send(event) or b""  # None only for ConnectionClosed, never sent here

    # -- plumbing --------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._limits.header_timeout, self._timed_out)

    def _read_again(self) -> None:
        """Read once the client reads our answers and no request waits behind a task."""
        if self._transport is not None and not (self._write_paused or self._pipelined):
            self._transport.resume_reading()

    def _close(self, abort: bool = False) -> None:
        """Close once the answer is flushed, or drop a peer that will not read it; a
        handler still answering is cancelled."""
        transport, self._transport = self._transport, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
        if transport is None:
            return
        if abort:
            transport.abort()
            return
        transport.close()
        if transport.get_write_buffer_size():
            asyncio.get_running_loop().call_later(_CLOSE_GRACE_S, transport.abort)


def _handler_failed(request: Request) -> Response:
    log.exception("handler failed for %s %s", request.method, request.path)
    return Response.text("Internal Server Error\n", 500)


def _check_head(event: h11.Request, limits: _Limits) -> None:
    # h11 bounds only a head that is still incomplete; one that arrived whole in a
    # single read is measured here (approximately: name, value and separators).
    size = len(event.target)
    for name, value in event.headers:
        size += len(name) + len(value) + 4
        if name == b"content-length" and int(value) > limits.max_body_bytes:
            raise _RequestError(413, "request body too large")
    if size > limits.max_header_bytes:
        raise _RequestError(431, "request header fields too large")


def _response_head(response: Response, content_length: int | None, closing: bool) -> h11.Response:
    headers: list[tuple[str, str]] = []
    if content_length is not None:
        headers.append(("content-length", str(content_length)))
    if response.content_type is not None:
        headers.append(("content-type", response.content_type))
    headers.extend(response.headers)
    if closing:
        headers.append(("connection", "close"))
    reason = _REASONS.get(response.status, b"")
    return h11.Response(status_code=response.status, headers=headers, reason=reason)


def _error_bytes(conn: h11.Connection, status: int, reason: str) -> bytes:
    """A whole plain-text error response that closes the connection; b"" when a response
    has begun already (nothing can be said any more)."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return b""
    body = f"{reason}\n".encode()
    headers = [
        ("content-type", "text/plain; charset=utf-8"),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    head = h11.Response(status_code=status, headers=headers, reason=_REASONS.get(status, b""))
    try:
        out = conn.send(head) or b""
        out += (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
    except h11.LocalProtocolError:
        return b""
    return out


def _listening_socket(host: str, port: int) -> socket.socket:
    """Bind here instead of letting asyncio resolve `host` on its thread pool: start-up
    then never waits on a resolver thread (slow on a busy node), and a numeric address,
    the usual case, needs no lookup at all."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name_bytes, value_bytes in raw:
        name, value = name_bytes.decode("latin-1"), value_bytes.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers
