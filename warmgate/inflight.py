"""Naming the requests still in flight when a drain ends early (pure, but for two readers).

warmgate does not proxy traffic, so the upstream's in-flight gauges give only a count.
Two ways to put names on it, as server-agnostic as they can be:

- **Client connections.** warmgate shares the pod's network namespace, so
  /proc/net/tcp and /proc/net/tcp6 list the upstream's established connections; each is
  named by its peer, "ip:port". warmgate's own connections (health and /metrics polls)
  are left out.
- **Request ids from the engine's log.** vLLM with `--enable-log-requests` logs
  `Received request <id>: params: ...` and, with `--enable-log-outputs` too, a closing
  `Generated response <id>: ...` line; aborts and failures log `Request <id> aborted.`,
  `Request <id> failed...` and `Aborted request(s) <id>,<id>.`. `RequestLog` is fed the
  child's output by the pump threads and keeps the ids opened and not yet closed.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from warmgate.childlog import LineScanner

LOG_FLAGS = ("--enable-log-requests", "--enable-log-outputs")
MAX_OPEN = 10_000  # ids kept at most; more are counted, not named
MAX_NAMED = 50  # names per list in a log line or /status; the rest are counted
LINE_HEAD = 4096  # bytes of an unfinished line kept: the id is near its start

# vLLM 0.32 logs a closing line for chat completions only (no output is logged for
# /v1/completions, /tokenize or pooling requests): other ids would never close.
TRACKED_PREFIX = "chatcmpl-"

# "(APIServer pid=1) INFO 11-23 15:00:00 [async_llm.py:578] " ends with vLLM's "[file:line] "
_LOGGER_PREFIX = re.compile(r"\[[^\]\s]+:\d+\] ")
_RECEIVED = re.compile(r"Received request (\S+): params: ")
_GENERATED = re.compile(r"Generated response (\S+?)( \(streaming (?:complete|delta)\))?: output: ")
_ENDED = re.compile(r"Request (\S+) (?:aborted\.|failed\b)")
_ABORTED = re.compile(r"Aborted request\(s\) (\S+)\.\s*$")
# The engine's own id: the external one + "-" + 8 random hex digits ("i_" first for n > 1).
_ENGINE_ID = re.compile(r"^(?:\d+_)?(.+)-[0-9a-f]{8}$")
_MARKERS = (b"request", b"Request", b"response")


def logs_request_ends(argv: Sequence[str]) -> bool:
    """True when `argv` turns on both of vLLM's request-logging flags (the last word wins)."""
    for flag in LOG_FLAGS:
        on = False
        for word in argv:
            if word == flag:
                on = True
            elif word == "--no-" + flag[2:]:
                on = False
        if not on:
            return False
    return True


class RequestLog(LineScanner):
    """Request ids the engine logged as received and not yet as finished.

    Pump threads call `feed` with raw chunks of each stream, split anywhere; the event
    loop reads `open_ids`. Only `Received request` opens an id: `Added request` carries
    the engine's internal id, which every closing line but one does not.
    """

    def __init__(self, max_open: int = MAX_OPEN) -> None:
        super().__init__()
        self.max_open = max_open
        self.dropped = 0  # ids not kept because max_open were open
        self._open: dict[str, None] = {}  # insertion-ordered: oldest first

    def scan(self, lines: list[bytes]) -> None:
        for line in lines:
            if any(marker in line for marker in _MARKERS):
                self._line(line[:LINE_HEAD].decode("utf-8", "replace").rstrip("\r"))

    def open_ids(self) -> list[str]:
        with self._lock:
            return list(self._open)

    def forget(self, containing: str) -> None:
        """Drop open ids that contain `containing` (requests known to have ended)."""
        with self._lock:
            for request_id in [r for r in self._open if containing in r]:
                del self._open[request_id]

    def _line(self, line: str) -> None:
        found = _LOGGER_PREFIX.search(line)
        message = line[found.end() :] if found else line
        if opened := _RECEIVED.match(message):
            self._opened(opened.group(1))
        elif generated := _GENERATED.match(message):
            if generated.group(2) != " (streaming delta)":
                self._open.pop(generated.group(1), None)
        elif ended := _ENDED.match(message):
            self._closed(ended.group(1))
        elif aborted := _ABORTED.match(message):
            for request_id in aborted.group(1).split(","):
                self._closed(request_id)

    def _opened(self, request_id: str) -> None:
        if not request_id.startswith(TRACKED_PREFIX) or request_id in self._open:
            return
        if len(self._open) >= self.max_open:
            self.dropped += 1
            return
        self._open[request_id] = None

    def _closed(self, request_id: str) -> None:
        if request_id in self._open:
            del self._open[request_id]
        elif (engine_id := _ENGINE_ID.match(request_id)) is not None:
            self._open.pop(engine_id.group(1), None)


# --- client connections -------------------------------------------------------------------

ESTABLISHED, LISTEN = 0x01, 0x0A


@dataclass(frozen=True, slots=True)
class TcpRow:
    """One row of /proc/net/tcp or /proc/net/tcp6."""

    local: tuple[str, int]
    remote: tuple[str, int]
    state: int
    inode: int


def parse_proc_net_tcp(text: str) -> list[TcpRow]:
    """The rows of a /proc/net/tcp or tcp6 table (its header line and bad rows skipped)."""
    rows = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        try:
            rows.append(
                TcpRow(_address(fields[1]), _address(fields[2]), int(fields[3], 16), int(fields[9]))
            )
        except (IndexError, ValueError):
            continue
    return rows


def _address(field: str) -> tuple[str, int]:
    """'0100007F:1F40' -> ('127.0.0.1', 8000); IPv4-mapped IPv6 reads as IPv4."""
    host, port = field.split(":")
    raw = bytes.fromhex(host)
    if len(raw) not in (4, 16):
        raise ValueError(field)
    if sys.byteorder == "little":  # the kernel prints each 32-bit word in host order
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw), int(port, 16)
    address = ipaddress.IPv6Address(raw)
    mapped = address.ipv4_mapped
    return (str(mapped) if mapped is not None else str(address)), int(port, 16)


def client_connections(rows: Iterable[TcpRow], port: int, own_inodes: set[int]) -> list[str]:
    """Peers ("ip:port") of the established connections served on `port`, sorted.

    A connection counts when its local port is `port` on an address the listener covers
    (any address, when no listener is seen), and its peer is not one of warmgate's own
    sockets (`own_inodes`).
    """
    rows = list(rows)
    listening = {r.local[0] for r in rows if r.state == LISTEN and r.local[1] == port}
    any_address = not listening or bool(listening & {"0.0.0.0", "::"})
    own = {r.local for r in rows if r.inode in own_inodes}
    peers = {
        r.remote
        for r in rows
        if r.state == ESTABLISHED
        and r.local[1] == port
        and (any_address or r.local[0] in listening)
        and r.remote not in own
    }
    return [_peer_name(peer) for peer in sorted(peers, key=_peer_key)]


def _peer_key(peer: tuple[str, int]) -> tuple[int, Any, int]:
    address = ipaddress.ip_address(peer[0])
    return address.version, address, peer[1]


def _peer_name(peer: tuple[str, int]) -> str:
    host, port = peer
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def read_client_connections(port: int) -> list[str] | None:
    """`client_connections` of this network namespace now; None where /proc/net is missing."""
    rows: list[TcpRow] = []
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows += parse_proc_net_tcp(f.read())
            readable = True
        except OSError:
            continue
    return client_connections(rows, port, own_socket_inodes()) if readable else None


def own_socket_inodes() -> set[int]:
    """Inodes of this process's sockets, from /proc/self/fd."""
    found: set[int] = set()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[len("socket:[") : -1]))
    return found


# --- the log fields -----------------------------------------------------------------------


def named(key: str, names: Sequence[str] | None, limit: int = MAX_NAMED) -> dict[str, Any]:
    """`{key: first limit names, key_more: how many more}`; nothing when names is None."""
    if names is None:
        return {}
    fields: dict[str, Any] = {key: list(names[:limit])}
    if len(names) > limit:
        fields[f"{key}_more"] = len(names) - limit
    return fields
