"""warmgate.httpserver over real sockets on 127.0.0.1 (port 0), driven by raw bytes.

Behaviour both kinds of handler share runs against each: `start_server` (an async handler in
a task) and `start_sync_server` (a plain function called inside `data_received`), on asyncio's
loop and on uvloop's, which the simulator and the probe server use."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import h11
import pytest
import uvloop

from warmgate.httpserver import (
    Request,
    Response,
    Server,
    SyncHandler,
    start_server,
    start_sync_server,
)

CLOSING_GET = b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"
WAIT_S = 3.0  # bound on every wait; a healthy run needs milliseconds


FLAVOURS = ("async", "async-uvloop", "sync", "sync-uvloop")
ASYNC_FLAVOURS = tuple(f for f in FLAVOURS if f.startswith("async"))


def run(coro: Coroutine[Any, Any, None], flavour: str = "async") -> None:
    runner = uvloop.run if flavour.endswith("uvloop") else asyncio.run
    runner(asyncio.wait_for(coro, 15))


@pytest.fixture(params=FLAVOURS)
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=ASYNC_FLAVOURS)
def async_flavour(request: pytest.FixtureRequest) -> str:
    """Only `start_server` takes a handler that awaits (streamed bodies, slow handlers)."""
    return str(request.param)


def echo(request: Request) -> Response:
    body = f"{request.method} {request.path} ?{request.query} {request.body.decode()}"
    return Response.text(body, headers=[("x-seen-host", request.headers.get("host", ""))])


async def async_echo(request: Request) -> Response:
    return echo(request)


async def start(flavour: str, answer: SyncHandler = echo, **limits: Any) -> Server:
    """`answer` served by the flavour under test (as an async handler for `start_server`)."""
    if flavour.startswith("sync"):
        return await start_sync_server(answer, "127.0.0.1", 0, **limits)

    async def handler(request: Request) -> Response:
        return answer(request)

    return await start_server(handler, "127.0.0.1", 0, **limits)


@contextlib.asynccontextmanager
async def serving(flavour: str, answer: SyncHandler = echo, **limits: Any) -> AsyncIterator[Server]:
    server = await start(flavour, answer, **limits)
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def serving_async(handler: Callable[[Request], Awaitable[Response]]) -> AsyncIterator[Server]:
    server = await start_server(handler, "127.0.0.1", 0)
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()


class Client:
    """A raw connection with an h11 client parser, so tests see exactly what was sent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, server: Server) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        return cls(reader, writer)

    def send(self, method: str, target: str, body: bytes = b"", **headers: str) -> None:
        hdrs = [("host", "t"), ("content-length", str(len(body)))]
        hdrs += [(k.replace("_", "-"), v) for k, v in headers.items()]
        out = self.h11.send(h11.Request(method=method, target=target, headers=hdrs)) or b""
        out += (self.h11.send(h11.Data(data=body)) or b"") if body else b""
        out += self.h11.send(h11.EndOfMessage()) or b""
        self.writer.write(out)

    async def event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.h11.receive_data(await asyncio.wait_for(self.reader.read(65536), WAIT_S))

    async def response(self) -> tuple[h11.Response, bytes]:
        head = await self.event()
        assert isinstance(head, h11.Response)
        body = b""
        while not isinstance(event := await self.event(), h11.EndOfMessage):
            body += event.data
        return head, body

    async def closed_by_server(self) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(65536), WAIT_S) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.writer.close()


async def until(check: Callable[[], bool]) -> None:
    """Wait for a state inside the server that no byte on the wire shows."""
    async with asyncio.timeout(WAIT_S):
        while not check():
            await asyncio.sleep(0.01)


async def raw_exchange(server: Server, data: bytes) -> bytes:
    """Send raw bytes; return everything the server sends before it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(data)
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await asyncio.wait_for(reader.read(65536), WAIT_S):
            received += chunk
    writer.close()
    return received


def test_port_zero_binds_a_real_port(flavour: str) -> None:
    async def scenario() -> None:
        async with serving(flavour) as server:
            assert server.port > 0
            assert server.host == "127.0.0.1"

    run(scenario(), flavour)


def test_keep_alive_serves_several_requests_on_one_connection(flavour: str) -> None:
    async def scenario() -> None:
        async with serving(flavour) as server:
            client = await Client.open(server)
            for i in range(3):
                client.send("POST", f"/p{i}?q={i}", b"hi")
                head, body = await client.response()
                assert head.status_code == 200
                assert body == f"POST /p{i} ?q={i} hi".encode()
                assert (b"x-seen-host", b"t") in head.headers
                client.h11.start_next_cycle()
            assert server.connection_count == 1
            client.close()

    run(scenario(), flavour)


def test_connection_close_is_honoured(flavour: str) -> None:
    async def scenario() -> None:
        async with serving(flavour) as server:
            client = await Client.open(server)
            client.send("GET", "/x", connection="close")
            head, _ = await client.response()
            assert head.status_code == 200
            assert (b"connection", b"close") in head.headers
            assert await client.closed_by_server()

    run(scenario(), flavour)


def test_http10_without_keep_alive_is_closed(flavour: str) -> None:
    async def scenario() -> None:
        async with serving(flavour) as server:
            received = await raw_exchange(server, b"GET /old HTTP/1.0\r\n\r\n")
            assert received.startswith(b"HTTP/1.1 200")
            assert received.endswith(b"GET /old ? ")

    run(scenario(), flavour)


def test_head_sends_headers_only(flavour: str) -> None:
    async def scenario() -> None:
        async with serving(flavour) as server:
            client = await Client.open(server)
            client.send("HEAD", "/x")
            head, body = await client.response()
            assert head.status_code == 200
            assert body == b""
            assert (b"content-length", b"10") in head.headers  # len("HEAD /x ? ")
            client.h11.start_next_cycle()
            client.send("GET", "/y")  # the connection is still usable afterwards
            assert (await client.response())[1] == b"GET /y ? "

    run(scenario(), flavour)


def test_streamed_body_arrives_chunk_by_chunk(async_flavour: str) -> None:
    first_seen = asyncio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"data: one\n\n"
        # The second chunk waits until the client has the first: proof of incremental flush.
        await asyncio.wait_for(first_seen.wait(), WAIT_S)
        yield b"data: two\n\n"

    async def handler(request: Request) -> Response:
        return Response(200, chunks(), content_type="text/event-stream")

    async def scenario() -> None:
        async with serving_async(handler) as server:
            client = await Client.open(server)
            client.send("GET", "/sse")
            head = await client.event()
            assert (b"transfer-encoding", b"chunked") in head.headers
            first = await client.event()
            assert first.data == b"data: one\n\n"
            first_seen.set()
            second = await client.event()
            assert second.data == b"data: two\n\n"
            assert isinstance(await client.event(), h11.EndOfMessage)

    run(scenario(), async_flavour)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS hello
        b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
    ],
)
def test_garbage_gets_400_and_close(garbage: bytes, flavour: str) -> None:
    async def scenario() -> None:
        async with serving(flavour) as server:
            received = await raw_exchange(server, garbage)
            assert received.startswith(b"HTTP/1.1 400 ")
            # ...and the server keeps serving others.
            ok = await raw_exchange(server, CLOSING_GET)
            assert ok.startswith(b"HTTP/1.1 200 ")

    run(scenario(), flavour)


def test_oversized_headers_get_431_and_close(flavour: str) -> None:
    async def scenario() -> None:
        async with serving(flavour, max_header_bytes=1024) as server:
            big = b"GET / HTTP/1.1\r\nhost: t\r\nx-big: " + b"a" * 4096 + b"\r\n\r\n"
            received = await raw_exchange(server, big)
            assert received.startswith(b"HTTP/1.1 431 ")

    run(scenario(), flavour)


def test_oversized_body_gets_413(flavour: str) -> None:
    async def scenario() -> None:
        async with serving(flavour, max_body_bytes=10) as server:
            client = await Client.open(server)
            client.send("POST", "/", b"x" * 11)
            head, _ = await client.response()
            assert head.status_code == 413
            assert await client.closed_by_server()

    run(scenario(), flavour)


def test_slow_sender_times_out_with_408_and_idle_connection_is_closed(flavour: str) -> None:
    async def scenario() -> None:
        async with serving(flavour, header_timeout=0.2) as server:
            received = await raw_exchange(server, b"GET /slow HTTP/1.1\r\nhost: t\r\n")
            assert received.startswith(b"HTTP/1.1 408 ")
            # A connection that never sends anything is closed without a word.
            assert await raw_exchange(server, b"") == b""

    run(scenario(), flavour)


def test_a_dribbled_head_over_the_cap_gets_431_and_close(flavour: str) -> None:
    """h11 holds at most max_header_bytes of a head that is still arriving."""

    async def scenario() -> None:
        async with serving(flavour, max_header_bytes=1024) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET / HTTP/1.1\r\nhost: t\r\nx-big: ")
            for _ in range(5):  # 1,280 bytes in all, in pieces, never a whole head
                await asyncio.sleep(0.01)
                writer.write(b"a" * 256)
            received = await asyncio.wait_for(reader.read(), WAIT_S)
            assert received.startswith(b"HTTP/1.1 431 ")
            await asyncio.wait_for(server.wait_connections_closed(), WAIT_S)
            writer.close()

    run(scenario(), flavour)


async def headless(server: Server, count: int) -> list[Client]:
    """`count` connections that send nothing, each one known to the server in turn."""
    clients = []
    for _ in range(count):
        clients.append(await Client.open(server))
        await until(lambda: len(server._headless) == len(clients))
    return clients


def test_at_the_cap_a_new_connection_evicts_the_oldest_headless_one(flavour: str) -> None:
    async def scenario() -> None:
        async with serving(flavour, max_connections=3) as server:
            oldest, middle = await headless(server, 2)
            # A head begun but not finished is headless too, and newer than the others.
            mid_head = await Client.open(server)
            mid_head.writer.write(b"GET /late HTTP/1.1\r\nhost")
            await until(lambda: len(server._headless) == 3)
            newcomer = await Client.open(server)
            newcomer.send("GET", "/new")
            assert (await newcomer.response())[1] == b"GET /new ? "
            assert await oldest.closed_by_server()
            assert server.evicted == 1
            for client, path in ((middle, "/middle"), (mid_head, None)):
                if path is None:
                    client.writer.write(b": t\r\n\r\n")
                    raw = await client.reader.readuntil(b"GET /late ? ")
                    assert raw.startswith(b"HTTP/1.1 200 ")
                else:
                    client.send("GET", path)
                    assert (await client.response())[1] == b"GET /middle ? "
            assert server.evicted == 1 and server.connection_count == 3

    run(scenario(), flavour)


def test_an_idle_keep_alive_connection_is_evicted_before_one_mid_head(flavour: str) -> None:
    async def scenario() -> None:
        async with serving(flavour, max_connections=2) as server:
            mid_head = await Client.open(server)  # the older of the two
            mid_head.writer.write(b"GET /slow HTTP/1.1\r\n")
            await until(lambda: len(server._headless) == 1)
            kept_alive = await Client.open(server)
            kept_alive.send("GET", "/done")
            await kept_alive.response()
            await until(lambda: len(server._kept_alive) == 1)
            newcomer = await Client.open(server)
            newcomer.send("GET", "/new")
            assert (await newcomer.response())[1] == b"GET /new ? "
            assert await kept_alive.closed_by_server()
            mid_head.writer.write(b"host: t\r\n\r\n")
            assert (await mid_head.response())[1] == b"GET /slow ? "
            assert server.evicted == 1

    run(scenario(), flavour)


def test_when_every_connection_is_answering_a_new_one_is_refused(async_flavour: str) -> None:
    started, release = asyncio.Semaphore(0), asyncio.Event()

    async def handler(request: Request) -> Response:
        started.release()
        await asyncio.wait_for(release.wait(), WAIT_S)
        return Response.text(request.path)

    async def scenario() -> None:
        server = await start_server(handler, "127.0.0.1", 0, max_connections=2)
        try:
            busy = [await Client.open(server) for _ in range(2)]
            for client in busy:
                client.send("GET", "/busy")
                await asyncio.wait_for(started.acquire(), WAIT_S)
            assert await refused(server)
            assert (server.refused, server.evicted) == (1, 0)
            release.set()
            for client in busy:
                assert (await client.response())[1] == b"/busy"
            # Answered, they wait as keep-alive connections: a newcomer evicts one of them.
            await until(lambda: len(server._kept_alive) == 2)
            again = await Client.open(server)
            again.send("GET", "/again")
            assert (await again.response())[1] == b"/again"
            assert server.evicted == 1
        finally:
            server.close()
            await server.wait_closed()

    run(scenario(), async_flavour)


async def refused(server: Server) -> bool:
    """A new connection is reset: at once, or as soon as it reads."""
    try:
        client = await Client.open(server)
    except ConnectionResetError:
        return True
    return await client.closed_by_server()


def test_a_client_that_dribbles_its_head_is_closed_at_the_head_deadline(flavour: str) -> None:
    """The deadline runs from the request's start: a byte every 0.2 s does not extend it."""
    head = b"GET / HTTP/1.1\r\nhost: t\r\nx-slow: " + b"a" * 200  # 40 s at that pace

    async def scenario() -> None:
        async with serving(flavour, header_timeout=0.6, idle_timeout=30) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            answer = asyncio.ensure_future(reader.read(65536))
            sent = 0
            with contextlib.suppress(ConnectionError):
                while not answer.done() and sent < len(head):
                    writer.write(head[sent : sent + 1])
                    await writer.drain()
                    sent += 1
                    await asyncio.sleep(0.2)
            assert (await asyncio.wait_for(answer, WAIT_S)).startswith(b"HTTP/1.1 408 ")
            assert sent < len(head)  # still sending when the deadline closed it
            assert await _closed(reader)
            writer.close()

    run(scenario(), flavour)


async def _closed(reader: asyncio.StreamReader) -> bool:
    with contextlib.suppress(ConnectionResetError):
        return await asyncio.wait_for(reader.read(65536), WAIT_S) == b""
    return True


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_time(flavour: str) -> None:
    async def scenario() -> None:
        # The head deadline is far beyond every wait here: only the idle time can close it.
        async with serving(flavour, header_timeout=60, idle_timeout=0.2) as server:
            client = await Client.open(server)
            client.send("GET", "/once")
            assert (await client.response())[0].status_code == 200
            assert await client.closed_by_server()
            assert server.evicted == 0

    run(scenario(), flavour)


@pytest.mark.skipif(not hasattr(socket, "TCP_DEFER_ACCEPT"), reason="Linux only")
def test_a_connection_held_silent_by_the_kernel_is_reset_without_a_transport(
    flavour: str,
) -> None:
    """With defer_accept a silent connection reaches the server only when the kernel gives
    up waiting for its first byte (past the head deadline here): it is reset at once."""

    async def scenario() -> None:
        async with serving(flavour, defer_accept=1, header_timeout=0.5) as server:
            silent = await Client.open(server)  # the kernel completes the handshake
            talking = await Client.open(server)
            talking.send("GET", "/talk")
            assert (await talking.response())[1] == b"GET /talk ? "
            assert server.silent == 0
            assert await silent.closed_by_server()
            assert (server.silent, server.evicted) == (1, 0)

    run(scenario(), flavour)


def test_handler_error_gives_500_and_the_server_keeps_serving(flavour: str) -> None:
    def handler(request: Request) -> Response:
        if request.path == "/boom":
            raise RuntimeError("boom")
        return Response.json({"ok": True})

    async def scenario() -> None:
        async with serving(flavour, handler) as server:
            client = await Client.open(server)
            client.send("GET", "/boom")
            assert (await client.response())[0].status_code == 500
            client.h11.start_next_cycle()
            client.send("GET", "/fine")
            head, body = await client.response()
            assert (head.status_code, body) == (200, b'{"ok":true}')
            assert (b"content-type", b"application/json") in head.headers

    run(scenario(), flavour)


def test_client_disconnect_cancels_the_stream(async_flavour: str) -> None:
    cancelled = asyncio.Event()

    async def forever() -> AsyncIterator[bytes]:
        try:
            yield b"first"
            await asyncio.sleep(3600)
            yield b"never"
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def handler(request: Request) -> Response:
        return Response(200, forever())

    async def scenario() -> None:
        async with serving_async(handler) as server:
            client = await Client.open(server)
            client.send("GET", "/stream")
            await client.event()
            assert (await client.event()).data == b"first"
            client.close()
            await asyncio.wait_for(cancelled.wait(), WAIT_S)
            while server.connection_count:
                await asyncio.sleep(0.01)

    run(scenario(), async_flavour)


def test_client_disconnect_cancels_a_slow_handler(async_flavour: str) -> None:
    cancelled = asyncio.Event()

    async def handler(request: Request) -> Response:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Response(200)

    async def scenario() -> None:
        async with serving_async(handler) as server:
            client = await Client.open(server)
            client.send("GET", "/slow")
            await asyncio.sleep(0.05)
            client.close()
            await asyncio.wait_for(cancelled.wait(), WAIT_S)
            await asyncio.wait_for(server.wait_connections_closed(), WAIT_S)

    run(scenario(), async_flavour)


def test_expect_100_continue_gets_100_then_the_answer(flavour: str) -> None:
    async def scenario() -> None:
        async with serving(flavour) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(
                b"POST /up HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n"
                b"expect: 100-continue\r\nconnection: close\r\n\r\n"
            )
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
            assert interim.startswith(b"HTTP/1.1 100 ")
            writer.write(b"hi")
            rest = await asyncio.wait_for(reader.read(), WAIT_S)
            assert rest.startswith(b"HTTP/1.1 200 ") and rest.endswith(b"POST /up ? hi")
            writer.close()

    run(scenario(), flavour)


def test_a_slow_body_times_out_too(flavour: str) -> None:
    async def scenario() -> None:
        async with serving(flavour, header_timeout=0.2) as server:
            head = b"POST /slow HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\nabc"
            received = await raw_exchange(server, head)
            assert received.startswith(b"HTTP/1.1 408 ")
            await asyncio.wait_for(server.wait_connections_closed(), WAIT_S)

    run(scenario(), flavour)


def test_sync_handler_with_a_streamed_body_gets_500() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"never"

    def handler(request: Request) -> Response:
        return Response(200, chunks())

    async def scenario() -> None:
        async with serving("sync", handler) as server:
            received = await raw_exchange(server, CLOSING_GET)
            assert received.startswith(b"HTTP/1.1 500 ")

    run(scenario(), "sync")


def test_pipelined_requests_are_answered_in_order(flavour: str) -> None:
    async def scenario() -> None:
        async with serving(flavour) as server:
            req = b"GET /%d HTTP/1.1\r\nhost: t\r\n\r\n"
            last = b"GET /3 HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"
            received = await raw_exchange(server, req % 1 + req % 2 + last)
            assert received.count(b"HTTP/1.1 200") == 3
            assert received.index(b"GET /1") < received.index(b"GET /2") < received.index(b"GET /3")

    run(scenario(), flavour)


def test_close_stops_accepting_and_ends_idle_keep_alive(flavour: str) -> None:
    async def scenario() -> None:
        server = await start(flavour)
        port = server.port
        client = await Client.open(server)
        client.send("GET", "/")
        await client.response()
        server.close()
        await server.wait_closed()
        assert await client.closed_by_server()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    run(scenario(), flavour)


def test_serves_on_a_socket_the_caller_bound(flavour: str) -> None:
    async def scenario() -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        if flavour.startswith("sync"):
            server = await start_sync_server(echo, sock=sock)
        else:
            server = await start_server(async_echo, sock=sock)
        try:
            assert server.port == port
            client = await Client.open(server)
            client.send("GET", "/bound")
            assert (await client.response())[1] == b"GET /bound ? "
        finally:
            server.close()
            await server.wait_closed()

    run(scenario(), flavour)
    with pytest.raises(ValueError, match="port"):
        run(start_server(async_echo, "127.0.0.1"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="port"):
        run(start_sync_server(echo, "127.0.0.1"))  # type: ignore[arg-type]


def test_a_request_sent_during_a_slow_answer_waits_its_turn(async_flavour: str) -> None:
    """Bytes of the next request that arrive while a handler still answers are kept (and
    reading stops) until that answer is out; then the next request is served."""
    started, release = asyncio.Event(), asyncio.Event()

    async def handler(request: Request) -> Response:
        if request.path == "/slow":
            started.set()
            await asyncio.wait_for(release.wait(), WAIT_S)
        return Response.text(request.path)

    async def scenario() -> None:
        async with serving_async(handler) as server:
            client = await Client.open(server)
            client.send("GET", "/slow")
            await asyncio.wait_for(started.wait(), WAIT_S)
            client.writer.write(b"GET /next HTTP/1.1\r\nhost: t\r\n\r\n")
            await until(lambda: any(conn._pipelined for conn in server._connections))
            release.set()
            assert (await client.response())[1] == b"/slow"
            client.h11.start_next_cycle()
            assert (await client.response())[1] == b"/next"
            client.close()

    run(scenario(), async_flavour)


def test_a_stream_waits_for_a_client_that_does_not_read(async_flavour: str) -> None:
    """Flow control: while the client reads nothing, the body's iterator is not asked for
    more than the socket buffers hold; once it reads, every byte arrives."""
    chunk, total = b"x" * 65536, 512  # 32 MiB, far beyond what the kernel buffers
    produced = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(total):
            produced += 1
            yield chunk

    async def handler(request: Request) -> Response:
        return Response(200, chunks())

    async def scenario() -> None:
        async with serving_async(handler) as server:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(CLOSING_GET)
            await until(lambda: any(conn._drained is not None for conn in server._connections))
            assert produced < total
            received = await asyncio.wait_for(reader.read(), WAIT_S * 5)
            assert produced == total
            _, _, body = received.partition(b"\r\n\r\n")
            assert body.count(b"x") == total * len(chunk)
            assert body.endswith(b"\r\n0\r\n\r\n")  # the chunked body's end
            writer.close()

    run(scenario(), async_flavour)


def test_pipelined_answers_wait_for_a_client_that_does_not_read(flavour: str) -> None:
    """Memory: answers to pipelined requests are made only as the client reads them, so the
    write buffer stays near its high-water mark instead of holding every answer."""
    body, count = b"x" * 65536, 200  # 12.5 MiB of answers to 6 KiB of requests

    def big(request: Request) -> Response:
        return Response(200, body)

    async def scenario() -> None:
        async with serving(flavour, big) as server:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n" * count)
            await until(lambda: any(conn._write_paused for conn in server._connections))
            (conn,) = server._connections
            assert conn._transport is not None
            assert conn._transport.get_write_buffer_size() < 1 << 20
            received = 0
            while received < count * len(body):
                chunk = await asyncio.wait_for(reader.read(1 << 20), WAIT_S)
                assert chunk
                received += chunk.count(b"x")
            assert received == count * len(body)
            writer.close()

    run(scenario(), flavour)


def test_a_stream_that_fails_cuts_the_connection(async_flavour: str) -> None:
    """Once the head is out a 500 is impossible: the client sees the body end early."""

    async def failing() -> AsyncIterator[bytes]:
        yield b"first"
        raise RuntimeError("the engine died")

    async def handler(request: Request) -> Response:
        if request.path == "/fail":
            return Response(200, failing())
        return Response.text("fine")

    async def scenario() -> None:
        async with serving_async(handler) as server:
            received = await raw_exchange(server, b"GET /fail HTTP/1.1\r\nhost: t\r\n\r\n")
            assert received.startswith(b"HTTP/1.1 200 ") and b"first" in received
            assert not received.endswith(b"\r\n0\r\n\r\n")
            ok = await raw_exchange(server, CLOSING_GET)
            assert ok.startswith(b"HTTP/1.1 200 ")

    run(scenario(), async_flavour)


def test_a_stream_in_flight_at_close_ends_with_the_connection(async_flavour: str) -> None:
    """`close` lets a stream in flight finish; the keep-alive connection then closes."""
    started, release = asyncio.Event(), asyncio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"one"
        started.set()
        await asyncio.wait_for(release.wait(), WAIT_S)
        yield b"two"

    async def handler(request: Request) -> Response:
        return Response(200, chunks())

    async def scenario() -> None:
        server = await start_server(handler, "127.0.0.1", 0)
        client = await Client.open(server)
        client.send("GET", "/stream")
        await asyncio.wait_for(started.wait(), WAIT_S)
        server.close()
        release.set()
        _, body = await client.response()
        assert body == b"onetwo"
        assert await client.closed_by_server()
        await asyncio.wait_for(server.wait_connections_closed(), WAIT_S)

    run(scenario(), async_flavour)
