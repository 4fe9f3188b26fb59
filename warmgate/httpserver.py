"""A small HTTP/1.1 server: h11 parses, asyncio carries bytes.

Used by the simulator and by the probe server the kubelet talks to, so it stays small:
one request at a time per connection, limits on everything a client controls
(connections, header bytes, body bytes, time to send a request head). Two flavours:

- `start_server`: an async handler, one task per connection on asyncio streams; a body
  may be streamed (SSE) and a client that leaves cancels its handler. The simulator.
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
from typing import Any, Protocol, cast

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


class _Closable(Protocol):
    def close_if_idle(self) -> None: ...


class Server:
    """A listening server. `port` is the bound port (useful with port=0)."""

    def __init__(self, handler: Handler | None, limits: _Limits) -> None:
        self._handler = handler  # None for a sync server: its connections hold the handler
        self._limits = limits
        self._listener: asyncio.Server | None = None
        self._connections: set[_Closable] = set()
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
        self._listener = await asyncio.start_server(
            self._accept, sock=sock, limit=self._limits.max_header_bytes, backlog=1024
        )

    async def _listen_sync(self, sock: socket.socket, handler: SyncHandler) -> None:
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            lambda: _SyncConnection(self, handler), sock=sock, backlog=1024
        )

    def _admit(self, conn: _Closable, sock: socket.socket | None) -> bool:
        """Count a new connection in, or refuse it: closing, or over the cap."""
        if self.closing or len(self._connections) >= self._limits.max_connections:
            return False
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._connections.add(conn)
        self._no_connections.clear()
        return True

    def _gone(self, conn: _Closable) -> None:
        self._connections.discard(conn)
        if not self._connections:
            self._no_connections.set()

    def _sockname(self) -> tuple[Any, ...]:
        if self._listener is None or not self._listener.sockets:
            raise RuntimeError("server is not listening")
        return tuple(self._listener.sockets[0].getsockname())

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._handler is not None
        conn = _Connection(self, self._handler, reader, writer)
        if not self._admit(conn, writer.get_extra_info("socket")):
            # Over the cap a client learns at once, instead of queueing behind others.
            writer.transport.abort()
            return
        try:
            await conn.serve()
        finally:
            self._gone(conn)


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
    `sock`, a socket the caller bound already."""
    limits = _Limits(max_connections, max_header_bytes, max_body_bytes, header_timeout)
    server = Server(handler, limits)
    await server._listen(_bound(host, port, sock))
    return server


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
    streamed body): it runs inside the connection's `data_received`. `header_timeout`
    bounds the time to send a whole request."""
    limits = _Limits(max_connections, max_header_bytes, max_body_bytes, header_timeout)
    server = Server(None, limits)
    await server._listen_sync(_bound(host, port, sock), handler)
    return server


def _bound(host: str | None, port: int | None, sock: socket.socket | None) -> socket.socket:
    """The caller's bound socket, or a new one listening on host:port (0: any free port)."""
    if sock is not None:
        return sock
    if port is None:
        raise ValueError("the server needs a port (0 for any free one) or a bound sock")
    return _listening_socket(host or "", port)


class _Connection:
    """One client connection: read a request, answer it, repeat while keep-alive holds."""

    def __init__(
        self,
        server: Server,
        handler: Handler,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self._server = server
        self._handler = handler
        self._limits = server._limits
        self._reader = reader
        self._writer = writer
        self._h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self._limits.max_header_bytes
        )
        self._idle = True  # waiting for a request head with no bytes of it received yet

    def close_if_idle(self) -> None:
        if self._idle:
            self._writer.close()

    async def serve(self) -> None:
        try:
            while True:
                request = await self._read_request()
                if request is None:
                    break
                if not await self._answer(request):
                    break
                if self._h11.our_state is not h11.DONE or self._h11.their_state is not h11.DONE:
                    break
                self._h11.start_next_cycle()
        except _RequestError as exc:
            await self._send_error(exc.status, str(exc))
        except (ConnectionError, h11.LocalProtocolError):
            pass  # the peer went away or the exchange is beyond repair: just close
        finally:
            await self._close()

    # -- reading ---------------------------------------------------------------------------

    async def _read_request(self) -> Request | None:
        """The next complete request, or None when the client closed between requests."""
        self._idle = True
        if self._server.closing:
            return None
        try:
            async with asyncio.timeout(self._limits.header_timeout):
                event = await self._next_event()
        except TimeoutError:
            if self._idle:
                return None  # an idle keep-alive connection: close quietly
            raise _RequestError(408, "request head not received in time") from None
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise _RequestError(400, f"unexpected {type(event).__name__}")
        self._idle = False
        _check_head(event, self._limits)
        if self._h11.they_are_waiting_for_100_continue:
            self._writer.write(self._send(h11.InformationalResponse(status_code=100, headers=[])))
        body = await self._read_body()
        target = event.target.decode("latin-1")
        path, _, query = target.partition("?")
        return Request(event.method.decode("ascii"), path, query, _headers(event.headers), body)

    async def _next_event(self) -> object:
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise _RequestError(exc.error_status_hint, str(exc)) from None
            if event is not h11.NEED_DATA:
                return event
            data = await self._reader.read(_RECV_BYTES)
            if data:
                self._idle = False
            self._h11.receive_data(data)

    async def _read_body(self) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                async with asyncio.timeout(self._limits.header_timeout):
                    event = await self._next_event()
            except TimeoutError:
                raise _RequestError(408, "request body not received in time") from None
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self._limits.max_body_bytes:
                    raise _RequestError(413, "request body too large")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise _RequestError(400, "incomplete request body")

    # -- answering -------------------------------------------------------------------------

    async def _answer(self, request: Request) -> bool:
        """Run the handler and send its response while watching for the client leaving;
        if it leaves first, the handler (and a streaming body) is cancelled.
        Returns whether the connection may carry another request."""
        respond = asyncio.create_task(self._respond(request))
        gone = asyncio.create_task(self._wait_client_gone())
        try:
            await asyncio.wait((respond, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (respond, gone):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if respond.cancelled():
            return False
        return respond.result()

    async def _wait_client_gone(self) -> None:
        data = await self._reader.read(_RECV_BYTES)
        if not data:
            return  # EOF: the client closed its side while we were still answering
        # A pipelined request: keep it for the next cycle and stop watching this one.
        self._h11.receive_data(data)
        await asyncio.get_running_loop().create_future()

    async def _respond(self, request: Request) -> bool:
        try:
            response = await self._handler(request)
        except Exception:
            log.exception("handler failed for %s %s", request.method, request.path)
            response = Response.text("Internal Server Error\n", 500)
        if isinstance(response.body, bytes):
            await self._send_whole(request.method, response, response.body)
            return True
        return await self._send_streamed(request.method, response, response.body)

    def _start(self, response: Response, content_length: int | None) -> bytes:
        return self._send(_response_head(response, content_length, self._server.closing))

    async def _send_whole(self, method: str, response: Response, body: bytes) -> None:
        out = self._start(response, len(body))
        if body and method != "HEAD":
            out += self._send(h11.Data(data=body))
        out += self._send(h11.EndOfMessage())
        self._writer.write(out)
        await self._writer.drain()

    async def _send_streamed(
        self, method: str, response: Response, body: AsyncIterator[bytes]
    ) -> bool:
        try:
            self._writer.write(self._start(response, None))
            if method != "HEAD":
                async for chunk in body:
                    if chunk:
                        self._writer.write(self._send(h11.Data(data=chunk)))
                        await self._writer.drain()
            self._writer.write(self._send(h11.EndOfMessage()))
            await self._writer.drain()
            return True
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:
            # Headers are out, so a 500 is impossible; a cut stream tells the client.
            log.exception("response stream failed for %s", method)
            self._writer.transport.abort()
            return False
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _send_error(self, status: int, reason: str) -> None:
        out = _error_bytes(self._h11, status, reason)
        if out:
            with contextlib.suppress(ConnectionError):
                self._writer.write(out)
                await self._writer.drain()

    def _send(self, event: h11.Event) -> bytes:
        return self._h11.send(event) or b""  # None only for ConnectionClosed, never sent here

    async def _close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(_CLOSE_GRACE_S):
                await self._writer.wait_closed()


class _SyncConnection(asyncio.Protocol):
    """One client connection of a sync server: each request is parsed and answered inside
    `data_received`. No task, no await, no stream objects: per request the loop only
    accepts, reads and closes. Run from a thread of its own, each of those is a wait for
    the GIL while another thread works, so the fewer the better."""

    def __init__(self, server: Server, handler: SyncHandler) -> None:
        self._server = server
        self._handler = handler
        self._limits = server._limits
        self._h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self._limits.max_header_bytes
        )
        self._transport: asyncio.Transport | None = None  # None: refused or closed
        self._head: h11.Request | None = None
        self._body: list[bytes] = []
        self._body_size = 0
        self._idle = True  # waiting for a request head with no bytes of it received yet
        self._timer: asyncio.TimerHandle | None = None

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
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None
        self._server._gone(self)

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return
        self._idle = False
        self._h11.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        if self._transport is not None:
            self._h11.receive_data(b"")
            self._process()
        return False  # let the transport close once our answer is flushed

    def pause_writing(self) -> None:
        # A client that does not read its answers is not read from either: pipelined
        # requests then cannot grow our write buffer without bound.
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    # -- requests --------------------------------------------------------------------------

    def _process(self) -> None:
        """Handle every complete event received so far (pipelined requests in order)."""
        try:
            while self._transport is not None:
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
                    self._answer()
                    self._next_cycle()
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

    def _answer(self) -> None:
        assert self._head is not None and self._transport is not None
        head, body, self._head, self._body, self._body_size = self._head, self._body, None, [], 0
        target = head.target.decode("latin-1")
        path, _, query = target.partition("?")
        method = head.method.decode("ascii")
        request = Request(method, path, query, _headers(head.headers), b"".join(body))
        try:
            response = self._handler(request)
            if not isinstance(response.body, bytes):
                raise TypeError("a sync handler's response body must be bytes")
        except Exception:
            log.exception("handler failed for %s %s", method, path)
            response = Response.text("Internal Server Error\n", 500)
        assert isinstance(response.body, bytes)
        closing = self._server.closing
        out = self._send(_response_head(response, len(response.body), closing))
        if response.body and method != "HEAD":
            out += self._send(h11.Data(data=response.body))
        out += self._send(h11.EndOfMessage())
        self._transport.write(out)

    def _next_cycle(self) -> None:
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
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

    # -- plumbing --------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._limits.header_timeout, self._timed_out)

    def _send(self, event: h11.Event) -> bytes:
        return self._h11.send(event) or b""  # None only for ConnectionClosed, never sent here

    def _close(self, abort: bool = False) -> None:
        """Close once the answer is flushed, or drop a peer that will not read it."""
        transport, self._transport = self._transport, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if transport is None:
            return
        if abort:
            transport.abort()
            return
        transport.close()
        if transport.get_write_buffer_size():
            asyncio.get_running_loop().call_later(_CLOSE_GRACE_S, transport.abort)


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
