"""warmgate.inflight: naming the requests in flight, from the engine's log and /proc/net/tcp.

The request log is fed real vLLM 0.32 lines (the texts of request_logger.py and
v1/engine/async_llm.py, with vLLM's logger prefix), split at every byte boundary.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from warmgate import inflight
from warmgate.inflight import RequestLog, TcpRow, client_connections, parse_proc_net_tcp

P = "(APIServer pid=4242) INFO 11-23 15:00:00"


def _received(rid: str) -> str:
    params = (
        "SamplingParams(n=1, presence_penalty=0.0, frequency_penalty=0.0, temperature=0.7, "
        "top_p=1.0, stop=['\\n'], max_tokens=200, skip_special_tokens=True)"
    )
    return (
        f"{P} [request_logger.py:65] Received request {rid}: params: {params}, lora_request: None."
    )


def _added(engine_id: str) -> str:
    return f"{P} [async_llm.py:578] Added request {engine_id}."


def _generated(rid: str, output: str, reason: str, stream: str = "") -> str:
    info = f" (streaming {stream})" if stream else ""
    return (
        f"{P} [request_logger.py:108] Generated response {rid}{info}: output: {output!r}, "
        f"finish_reason: {reason}"
    )


# Two streams, as vLLM's API server and engine core write them. Ids with dashes, as vLLM
# makes them from X-Request-Id headers, and the engine's ids with 8 random hex digits.
STDOUT = [
    "INFO:     Started server process [4242]",
    _received("chatcmpl-done-1"),
    _added("chatcmpl-done-1-0a1b2c3d"),
    _received("chatcmpl-stream-2"),
    _added("chatcmpl-stream-2-9f8e7d6c"),
    _received("chatcmpl-still-3"),
    _added("chatcmpl-still-3-11111111"),
    _received("cmpl-legacy-4-0"),  # /v1/completions: vLLM never logs its end
    _added("cmpl-legacy-4-0-22222222"),
    f"{P} [request_logger.py:65] Received request tokenize-5: params: None, lora_request: None.",
    _generated("chatcmpl-stream-2", " a", "None", "delta"),  # a delta does not end it
    _generated("chatcmpl-done-1", "Paris. Request x aborted.", "stop"),
    _received("chatcmpl-gone-6"),
    _added("chatcmpl-gone-6-33333333"),
    _received("chatcmpl-fail-7"),
    _received("chatcmpl-n-8"),
    _added("0_chatcmpl-n-8-44444444"),
    _added("1_chatcmpl-n-8-44444444"),
    _received("chatcmpl-cut-9"),
    _received("chatcmpl-still-10"),
]
STDERR = [
    "Processed prompts: 100%|██████████| 1/1 [00:00<00:00]\r",
    _generated("chatcmpl-stream-2", " a b c", "streaming_complete", "complete"),
    f"{P} [async_llm.py:922] Aborted request(s) chatcmpl-gone-6-33333333.",
    f"{P} [async_llm.py:783] Request chatcmpl-gone-6 aborted.",
    f"{P} [async_llm.py:795] Request chatcmpl-fail-7 failed (bad request): too long.",
    f"{P} [async_llm.py:922] Aborted request(s) 0_chatcmpl-n-8-44444444,1_chatcmpl-n-8-44444444.",
    f"{P} [async_llm.py:789] Request chatcmpl-cut-9 failed (engine dead).",
]
STILL_OPEN = ["chatcmpl-still-3", "chatcmpl-still-10"]


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000, 1 << 20])
def test_request_log_keeps_what_was_received_and_not_ended(size: int) -> None:
    out = "".join(line + "\n" for line in STDOUT).encode()
    err = "".join(line + "\n" for line in STDERR).encode()
    log = RequestLog()
    # Both streams at once, each split every `size` bytes (inside UTF-8 characters too).
    # stdout goes first: vLLM's closing lines never come before the opening ones.
    for chunk in _chunks(out, size):
        log.feed(1, chunk)
    for chunk in _chunks(err, size):
        log.feed(2, chunk)
        log.feed(1, b"")
    assert log.open_ids() == STILL_OPEN
    assert log.dropped == 0


def test_an_unfinished_line_waits_for_its_end() -> None:
    log = RequestLog()
    log.feed(1, _received("chatcmpl-a").encode())
    assert log.open_ids() == []
    log.feed(2, _received("chatcmpl-b").encode() + b"\n")  # another stream: its own line
    log.feed(1, b"\n")
    assert log.open_ids() == ["chatcmpl-b", "chatcmpl-a"]


def test_a_long_line_keeps_its_head() -> None:
    log = RequestLog()
    line = _received("chatcmpl-long").replace("max_tokens=200", "x" * 100_000).encode()
    for chunk in _chunks(line + b"\n", 4000):
        log.feed(1, chunk)
    assert log.open_ids() == ["chatcmpl-long"]


def test_the_open_set_is_capped_and_counts_what_it_dropped() -> None:
    log = RequestLog(max_open=3)
    log.feed(1, "".join(_received(f"chatcmpl-{i}") + "\n" for i in range(5)).encode())
    assert log.open_ids() == ["chatcmpl-0", "chatcmpl-1", "chatcmpl-2"]
    assert log.dropped == 2
    log.feed(1, (_generated("chatcmpl-0", "x", "stop") + "\n").encode())
    log.feed(1, (_received("chatcmpl-5") + "\n").encode())
    assert log.open_ids() == ["chatcmpl-1", "chatcmpl-2", "chatcmpl-5"]


def test_forget_drops_the_warm_ups_own_ids() -> None:
    log = RequestLog()
    log.feed(
        1, (_received("chatcmpl-warmgate-00ff") + "\n" + _received("chatcmpl-x") + "\n").encode()
    )
    log.forget("warmgate-")
    assert log.open_ids() == ["chatcmpl-x"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["vllm", "serve", "m", "--enable-log-requests", "--enable-log-outputs"], True),
        (["vllm", "serve", "m", "--enable-log-requests"], False),
        (["vllm", "serve", "m", "--enable-log-outputs"], False),
        (["vllm", "serve", "m"], False),
        (["vllm", "serve", *inflight.LOG_FLAGS, "--no-enable-log-requests"], False),
    ],
)
def test_ids_are_tracked_only_when_both_flags_are_on(argv: list[str], expected: bool) -> None:
    assert inflight.logs_request_ends(argv) is expected


# --- connections ---------------------------------------------------------------------------

HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
    "timeout inode"
)


def _row(n: int, local: str, remote: str, state: str, inode: int) -> str:
    return (
        f"   {n}: {local} {remote} {state} 00000000:00000000 00:00000000 00000000     0        0 "
        f"{inode} 1 0000000000000000 20 4 30 10 -1"
    )


@pytest.mark.skipif(sys.byteorder != "little", reason="the table's hex is in host byte order")
def test_proc_net_tcp_rows_are_read() -> None:
    text = "\n".join(
        [
            HEADER,
            _row(0, "0100007F:1F40", "00000000:0000", "0A", 100),  # 127.0.0.1:8000 listening
            _row(1, "0100007F:1F40", "0100007F:D431", "01", 101),  # 127.0.0.1:54321
            "   2: garbage",
        ]
    )
    assert parse_proc_net_tcp(text) == [
        TcpRow(("127.0.0.1", 8000), ("0.0.0.0", 0), 0x0A, 100),
        TcpRow(("127.0.0.1", 8000), ("127.0.0.1", 54321), 0x01, 101),
    ]
    text6 = "\n".join(
        [
            HEADER,
            # [::1]:8000 <- [::ffff:10.0.0.10]:50000
            _row(0, f"{'0' * 24}01000000:1F40", f"{'0' * 16}FFFF00000A00000A:C350", "01", 200),
        ]
    )
    assert parse_proc_net_tcp(text6) == [TcpRow(("::1", 8000), ("10.0.0.10", 50000), 0x01, 200)]


def test_client_connections_leave_out_warmgates_own_and_other_ports() -> None:
    rows = [
        TcpRow(("0.0.0.0", 8000), ("0.0.0.0", 0), 0x0A, 1),  # the listener: any address
        TcpRow(("10.0.0.5", 8000), ("10.0.0.9", 40000), 0x01, 2),  # a client
        TcpRow(("127.0.0.1", 8000), ("127.0.0.1", 50000), 0x01, 3),  # warmgate's poll, served
        TcpRow(("127.0.0.1", 50000), ("127.0.0.1", 8000), 0x01, 4),  # warmgate's own end
        TcpRow(("10.0.0.5", 8000), ("10.0.0.7", 40001), 0x08, 5),  # CLOSE_WAIT: client gone
        TcpRow(("10.0.0.5", 9000), ("10.0.0.9", 40002), 0x01, 6),  # another port
        TcpRow(("::1", 8000), ("::1", 40003), 0x01, 7),
    ]
    assert client_connections(rows, 8000, own_inodes={4}) == ["10.0.0.9:40000", "[::1]:40003"]
    # A listener on one address serves only that address.
    on_loopback = [TcpRow(("127.0.0.1", 8000), ("0.0.0.0", 0), 0x0A, 1), *rows[1:]]
    assert client_connections(on_loopback, 8000, own_inodes={4}) == []


def test_named_caps_a_list_and_counts_the_rest() -> None:
    names = [f"10.0.0.1:{port}" for port in range(60)]
    assert inflight.named("connections", names, 50) == {
        "connections": names[:50],
        "connections_more": 10,
    }
    assert inflight.named("requests", [], 50) == {"requests": []}
    assert inflight.named("requests", None, 50) == {}


def test_connections_of_this_network_namespace_are_read_live() -> None:
    """Over loopback: another process's clients are named, this process's own are not."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        own = socket.create_connection(("127.0.0.1", port))
        accepted = [server.accept()[0]]
        code = (
            "import socket, sys, time\n"
            f"c = [socket.create_connection(('127.0.0.1', {port})) for _ in range(2)]\n"
            "print(' '.join(str(s.getsockname()[1]) for s in c), flush=True)\n"
            "sys.stdin.read()\n"
        )
        client = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            assert client.stdout is not None
            ports = sorted(int(p) for p in client.stdout.readline().split())
            accepted += [server.accept()[0] for _ in ports]
            deadline = time.monotonic() + 5
            while (found := inflight.read_client_connections(port)) != [
                f"127.0.0.1:{p}" for p in ports
            ] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert found == [f"127.0.0.1:{p}" for p in ports]
        finally:
            client.kill()
            client.wait(5)
            own.close()
            for conn in accepted:
                conn.close()
