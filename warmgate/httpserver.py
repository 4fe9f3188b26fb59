"""A small HTTP/1.1 server: h11 parses, asyncio streams carry bytes.

Used by the simulator and by the probe server the kubelet talks to, so it stays small:
one task per connection, one request at a time on it, limits on everything a client
controls (connections, header bytes, body bytes, time to send a request head).
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
from typing import Any

import h11

__all__ = ["Handler", "Request", "Response", "Server", "start_server"]

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

    def __init__(self, handler: Handler, limits: _Limits) -> None:
        self._handler = handler
        self._limits = limits
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
        self._listener = await asyncio.start_server(
            self._accept, sock=sock, limit=self._limits.max_header_bytes, backlog=1024
        )

    def _sockname(self) -> tuple[Any, ...]:
        if self._listener is None or not self._listener.sockets:
            raise RuntimeError("server is not listening")
        return tuple(self._listener.sockets[0].getsockname())

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.closing or len(self._connections) >= self._limits.max_connections:
            # Over the cap a client learns at once, instead of queueing behind others.
            writer.transport.abort()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Connection(self, reader, writer)
        self._connections.add(conn)
        self._no_connections.clear()
        try:
            await conn.serve()
        finally:
            self._connections.discard(conn)
            if not self._connections:
                self._no_connections.set()


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
    if sock is None:
        if port is None:
            raise ValueError("start_server needs a port (0 for any free one) or a bound sock")
        sock = _listening_socket(host or "", port)
    limits = _Limits(max_connections, max_header_bytes, max_body_bytes, header_timeout)
    server = Server(handler, limits)
    await server._listen(sock)
    return server


class _Connection:
    """One client connection: read a request, answer it, repeat while keep-alive holds."""

    def __init__(
        self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._server = server
        self._handler = server._handler
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
        self._check_head(event)
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

    def _check_head(self, event: h11.Request) -> None:
        # h11 bounds only a head that is still incomplete; one that arrived whole in a
        # single read is measured here (approximately: name, value and separators).
        size = len(event.target)
        for name, value in event.headers:
            size += len(name) + len(value) + 4
            if name == b"content-length" and int(value) > self._limits.max_body_bytes:
                raise _RequestError(413, "request body too large")
        if size > self._limits.max_header_bytes:
            raise _RequestError(431, "request header fields too large")

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
        headers: list[tuple[str, str]] = []
        if content_length is not None:
            headers.append(("content-length", str(content_length)))
        if response.content_type is not None:
            headers.append(("content-type", response.content_type))
        headers.extend(response.headers)
        if self._server.closing:
            headers.append(("connection", "close"))
        reason = _REASONS.get(response.status, b"")
        return self._send(h11.Response(status_code=response.status, headers=headers, reason=reason))

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
        if self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f"{reason}\n".encode()
        headers = [
            ("content-type", "text/plain; charset=utf-8"),
            ("content-length", str(len(body))),
            ("connection", "close"),
        ]
        with contextlib.suppress(h11.LocalProtocolError, ConnectionError):
            out = self._send(
                h11.Response(status_code=status, headers=headers, reason=_REASONS.get(status, b""))
            )
            out += self._send(h11.Data(data=body)) + self._send(h11.EndOfMessage())
            self._writer.write(out)
            await self._writer.drain()

    def _send(self, event: h11.Event) -> bytes:
        return self._h11.send(event) or b""  # None only for ConnectionClosed, never sent here

    async def _close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(_CLOSE_GRACE_S):
                await self._writer.wait_closed()


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
