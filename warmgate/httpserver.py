"""A small HTTP/1.1 server: h11 parses, asyncio carries bytes.

Used by the simulator and by the probe server the kubelet talks to, so it stays small:
one request at a time per connection, limits on everything a client controls
(connections, header bytes, body bytes, time to send a request, time left idle). A full
server cannot be starved by connections that send nothing useful: a new connection closes
the oldest idle keep-alive one, else the oldest one without a whole request head, and is
refused only when every connection holds a request being answered. One connection class,
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
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, TypedDict, cast

import h11

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "Handler",
    "Request",
    "Response",
    "Server",
    "ServerOptions",
    "SyncHandler",
    "start_server",
    "start_sync_server",
]

log = logging.getLogger(__name__)

_RECV_BYTES = 65536
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
# How long a closing connection may take to flush its last bytes before we drop it.
_CLOSE_GRACE_S = 1.0
# The kernel queues connections we have not accepted yet: a burst waits there, not refused.
# (Linux caps it at net.core.somaxconn, 4096 by default.)
_BACKLOG = 4096
# Accepted per wake-up of the listener: sockets of connections evicted to make room are
# released before the next batch, so open sockets stay within max_connections + this.
_ACCEPT_BATCH = 32
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST
_TCP_INFO_BYTES = 104  # struct tcp_info up to tcpi_total_retrans, a u32 at offset 100


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
    header_timeout: float  # from a request's first byte (or the connection's start) to its end
    idle_timeout: float  # a keep-alive connection waiting for its next request
    defer_accept: int  # seconds the kernel holds a connection that has sent nothing (0: off)


class _RequestError(Exception):
    """The request cannot be served; answer `status` and close the connection."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class Server:
    """A listening server. `port` is the bound port (useful with port=0).

    It accepts connections itself, a batch per wake-up, so that it can make room before it
    takes a socket: at the cap the oldest idle keep-alive connection is closed, else the
    oldest connection still without a whole request head; two insertion-ordered dicts make
    that O(1) per accept. Connections answering a request are never evicted; when they
    alone fill the cap, a new connection is reset at once."""

    def __init__(
        self, limits: _Limits, handler: Handler | None, answer: SyncHandler | None
    ) -> None:
        self._limits = limits
        self._handler = handler  # awaited in a task per request
        self._answer = answer  # called inside data_received
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deferring = False  # silent connections arrive only past the head deadline
        self._connections: set[_Connection] = set()
        # Evictable connections, oldest first (dict order is insertion order).
        self._kept_alive: dict[_Connection, None] = {}  # between requests
        self._headless: dict[_Connection, None] = {}  # no whole request head yet
        self._open = 0  # accepted sockets not yet closed, counted against the cap
        self._no_connections = asyncio.Event()
        self._no_connections.set()
        self.closing = False
        self.evicted = 0  # connections closed to make room for a new one
        self.refused = 0  # connections reset because every one was answering a request
        self.silent = 0  # reset at accept: held by the kernel past the head deadline, silent

    @property
    def host(self) -> str:
        return str(self._sockname()[0])

    @property
    def port(self) -> int:
        return int(self._sockname()[1])

    @property
    def connection_count(self) -> int:
        return self._open

    def close(self) -> None:
        """Stop accepting; close idle keep-alive connections; later responses say
        `Connection: close`. Requests in flight go on until their handlers finish."""
        self.closing = True
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            sock.close()
        for conn in list(self._connections):
            conn.close_if_idle()

    async def wait_closed(self) -> None:
        """The listening socket is closed by `close` itself; kept for asyncio's shape."""

    async def wait_connections_closed(self) -> None:
        """Return once every accepted connection has gone (served or dropped)."""
        await self._no_connections.wait()

    async def _listen(self, sock: socket.socket) -> None:
        if self._limits.defer_accept and hasattr(socket, "TCP_DEFER_ACCEPT"):
            # Linux hands us a connection once its first bytes arrive (or the time is up,
            # rounded up to the next SYN-ACK retry): idle ones wait in the kernel, costing
            # no descriptor, no memory of ours and no place under the cap.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, self._limits.defer_accept)
            self._deferring = self._limits.defer_accept >= self._limits.header_timeout
        sock.listen(_BACKLOG)
        sock.setblocking(False)
        self._sock, self._loop = sock, asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        listener = self._sock
        for _ in range(_ACCEPT_BATCH):
            if listener is None or self.closing:
                return
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # EMFILE, ENOBUFS: leave the rest queued, retry soon
                log.warning("accept failed: %s; retrying in %.1f s", exc, _CLOSE_GRACE_S)
                self._pause_accepting(_CLOSE_GRACE_S)
                return
            if self._silent_too_long(sock):
                self.silent += 1
                _reset_socket(sock)
                continue
            if not self._make_room():
                self.refused += 1
                _reset_socket(sock)
                continue
            self._open += 1
            self._no_connections.clear()
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._start(sock)

    def _silent_too_long(self, sock: socket.socket) -> bool:
        """A connection that TCP_DEFER_ACCEPT held until its time was up (its SYN-ACK was
        sent again, so the kernel counts a retransmission) and that still has sent nothing
        has been silent longer than the head deadline allows: no transport is made for it.
        A connection that arrives through SYN cookies has no such retransmission."""
        if not self._deferring:
            return False
        try:
            with contextlib.suppress(BlockingIOError):
                if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                    return False  # its first bytes are here
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
        except OSError:
            return True  # reset by the client already
        return len(info) >= _TCP_INFO_BYTES and struct.unpack_from("I", info, 100)[0] > 0

    def _make_room(self) -> bool:
        """Below the cap, or room made by evicting one connection; False: all are busy."""
        if self._open < self._limits.max_connections:
            return True
        for waiting, gently in ((self._kept_alive, True), (self._headless, False)):
            if waiting:
                victim = next(iter(waiting))
                self.evicted += 1
                # Its socket is released before the next batch; this one may exceed the cap.
                victim.evict(gently)
                return True
        return False

    def _start(self, sock: socket.socket) -> None:
        assert self._loop is not None
        conn = _Connection(self)
        made = self._loop.create_task(self._loop.connect_accepted_socket(lambda: conn, sock))
        made.add_done_callback(lambda task: self._start_failed(task, conn, sock))

    def _start_failed(
        self,
        task: asyncio.Task[tuple[asyncio.Transport, _Connection]],
        conn: _Connection,
        sock: socket.socket,
    ) -> None:
        if task.cancelled() or task.exception() is None or conn.made:
            return
        sock.close()  # never reached connection_made, so connection_lost will not count it
        self._count_closed()

    def _pause_accepting(self, seconds: float) -> None:
        if self._sock is None or self._loop is None:
            return
        fd = self._sock.fileno()
        self._loop.remove_reader(fd)

        def resume() -> None:
            if self._sock is not None and self._loop is not None:
                self._loop.add_reader(fd, self._accept)

        self._loop.call_later(seconds, resume)

    def _waiting(self, conn: _Connection, where: dict[_Connection, None] | None) -> None:
        """Move `conn` to the end of `where` (None: busy with a request, or gone)."""
        self._kept_alive.pop(conn, None)
        self._headless.pop(conn, None)
        if where is not None:
            where[conn] = None

    def _gone(self, conn: _Connection) -> None:
        self._waiting(conn, None)
        self._connections.discard(conn)
        self._count_closed()

    def _count_closed(self) -> None:
        self._open -= 1
        if not self._open:
            self._no_connections.set()

    def _sockname(self) -> tuple[Any, ...]:
        if self._sock is None:
            raise RuntimeError("server is not listening")
        return tuple(self._sock.getsockname())


class ServerOptions(TypedDict, total=False):
    """The keyword options of `start_server` and `start_sync_server`; see `start_server`."""

    sock: socket.socket | None
    max_connections: int
    max_header_bytes: int
    max_body_bytes: int
    header_timeout: float
    idle_timeout: float
    defer_accept: int


async def start_server(
    handler: Handler,
    host: str | None = None,
    port: int | None = None,
    **options: Unpack[ServerOptions],
) -> Server:
    """Listen on host:port (port 0 picks a free one; read it from `Server.port`), or on
    `sock`, a socket the caller bound already. `header_timeout` (10 s) bounds the time to
    send a whole request (head and body), from the connection's start or the request's
    first byte, however slowly the bytes come; a keep-alive connection that waits
    `idle_timeout` (10 s) for its next request is closed. At `max_connections` (256) a new
    connection evicts the oldest one that is idle or has no whole head yet (see `Server`).
    With `defer_accept` (Linux; 0: off) a connection that sends nothing is accepted only
    after that many seconds. Heads over `max_header_bytes` (16 KiB) get 431, bodies over
    `max_body_bytes` (8 MiB) 413."""
    return await _start(handler, None, host, port, **options)


async def start_sync_server(
    handler: SyncHandler,
    host: str | None = None,
    port: int | None = None,
    **options: Unpack[ServerOptions],
) -> Server:
    """As `start_server`, for a handler that answers at once from memory (no I/O, no
    streamed body): it runs inside the connection's `data_received`."""
    return await _start(None, handler, host, port, **options)


async def _start(
    handler: Handler | None,
    answer: SyncHandler | None,
    host: str | None,
    port: int | None,
    *,
    sock: socket.socket | None = None,
    max_connections: int = 256,
    max_header_bytes: int = 16384,
    max_body_bytes: int = 8 << 20,
    header_timeout: float = 10.0,
    idle_timeout: float = 10.0,
    defer_accept: int = 0,
) -> Server:
    limits = _Limits(
        max_connections,
        max_header_bytes,
        max_body_bytes,
        header_timeout,
        idle_timeout,
        defer_accept,
    )
    server = Server(limits, handler, answer)
    await server._listen(_bound(host, port, sock))
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
        self._transport: asyncio.Transport | None = None  # None: not made yet, or closed
        self.made = False
        self._head: h11.Request | None = None
        self._body: list[bytes] = []
        self._body_size = 0
        self._idle = True  # waiting for a request head with no bytes of it received yet
        self._kept_alive = False  # idle after a response (not a new connection)
        self._timer: asyncio.TimerHandle | None = None  # bounds the time to send a request
        self._task: asyncio.Task[None] | None = None  # an async handler answering
        self._pipelined = False  # bytes arrived while the task answers: reading waits
        self._write_paused = False  # the client's socket is full
        self._drained: asyncio.Future[None] | None = None  # a stream waiting for room

    def close_if_idle(self) -> None:
        if self._idle:
            self._close()

    def evict(self, gently: bool) -> None:
        """Make room for a new connection: a kept-alive one is closed as its idle timeout
        would close it; one still sending its head is reset, nothing is owed to it."""
        if gently:
            self._close()
        else:
            self._reset()

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is one, not a subclass
        self._server._connections.add(self)
        if self._server.closing:
            self._close()
            return
        self._server._waiting(self, self._server._headless)
        self._arm_timer(self._limits.header_timeout)

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
        if self._idle:
            self._request_begins()
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
        if self._task is None:
            self._process()  # pipelined requests that waited for room to answer them

    # -- requests --------------------------------------------------------------------------

    def _process(self) -> None:
        """Handle every complete event received so far, until an async handler's task
        holds the connection or the client stops reading: answers to pipelined requests
        then wait in h11's buffer (one read at most), not in ours."""
        try:
            while self._transport is not None and self._task is None and not self._write_paused:
                event = self._h11.next_event()
                if event is h11.NEED_DATA:
                    return
                if isinstance(event, h11.Request):
                    _check_head(event, self._limits)
                    self._head = event
                    self._server._waiting(self, None)  # busy: never evicted
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
        self._pipelined = False
        self._read_again()
        self._process()

    def _next_cycle(self) -> None:
        h = self._h11
        if h.our_state is h11.DONE and h.their_state is h11.DONE and not self._server.closing:
            h.start_next_cycle()
            self._idle = self._kept_alive = True
            self._server._waiting(self, self._server._kept_alive)
            self._arm_timer(self._limits.idle_timeout)
            if h.trailing_data[0]:  # a pipelined request, whole or in part
                self._request_begins()
        else:
            self._close()  # Connection: close, HTTP/1.0, or the server is closing

    def _request_begins(self) -> None:
        """The first bytes of a request head: the time to send it starts now."""
        self._idle = False
        if self._kept_alive:
            self._kept_alive = False
            self._server._waiting(self, self._server._headless)
            self._arm_timer(self._limits.header_timeout)

    def _timed_out(self) -> None:
        self._timer = None
        if self._kept_alive:
            self._close()  # an idle keep-alive connection: close quietly
        elif self._idle:
            self._reset()  # it never sent a byte
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

    def _arm_timer(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._timed_out)

    def _read_again(self) -> None:
        """Read once the client reads our answers and no request waits behind a task."""
        if self._transport is not None and not (self._write_paused or self._pipelined):
            self._transport.resume_reading()

    def _reset(self) -> None:
        """Close with a RST. A server that closes first keeps the connection in TIME_WAIT
        for a minute, and a client that reuses its port then waits a second for its SYN
        to be retried: under a flood that would be a probe's second."""
        if self._transport is not None:
            with contextlib.suppress(OSError, AttributeError):
                self._transport.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET
                )
        self._close(abort=True)

    def _close(self, abort: bool = False) -> None:
        """Close once the answer is flushed, or drop a peer that will not read it; a
        handler still answering is cancelled."""
        transport, self._transport = self._transport, None
        self._server._waiting(self, None)
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


def _reset_socket(sock: socket.socket) -> None:
    """Close with a RST: the client learns at once, and no TIME_WAIT is left here."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


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
