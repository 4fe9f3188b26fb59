"""Model servers warmgate recognises in its child's command line (pure; no I/O).

When the child is one of these, warm-up mode is on without `--upstream`: the
upstream is the child's own --host/--port, or the server's default port.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# host values that mean "every interface": we reach those over loopback
_ANY_HOST = {"", "0.0.0.0", "::", "[::]"}


@dataclass(frozen=True, slots=True)
class KnownServer:
    name: str
    default_port: int
    port_env: str | None = None  # an environment variable that sets the port


VLLM = KnownServer("vllm", 8000)
SIM = KnownServer("warmgate-sim", 8000, "WARMGATE_SIM_PORT")
SGLANG = KnownServer("sglang", 30000)


def recognise(argv: Sequence[str]) -> KnownServer | None:
    """Which known server `argv` starts, if any (`vllm serve`, `python -m ...`, `warmgate sim`)."""
    words = [os.path.basename(argv[0]), *argv[1:]] if argv else []
    for i, word in enumerate(words):
        following = words[i + 1] if i + 1 < len(words) else ""
        if word == "vllm" and following == "serve":
            return VLLM
        if word == "-m" and following.startswith("vllm.entrypoints.openai.api_server"):
            return VLLM
        if word == "-m" and following in ("sglang.launch_server",):
            return SGLANG
        if i == 0 and word == "warmgate" and following == "sim":
            return SIM
        if (
            word == "-m"
            and following == "warmgate"
            and i + 2 < len(words)
            and words[i + 2] == "sim"
        ):
            return SIM
    return None


def option(argv: Sequence[str], name: str) -> str | None:
    """The last value of `--name VALUE` or `--name=VALUE` in argv (last one wins, as argparse)."""
    value = None
    for i, word in enumerate(argv):
        if word == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif word.startswith(name + "="):
            value = word[len(name) + 1 :]
    return value


def upstream_url(argv: Sequence[str], environ: Mapping[str, str]) -> str | None:
    """http://host:port of the server `argv` starts, or None if it is not one we know."""
    server = recognise(argv)
    if server is None:
        return None
    host = option(argv, "--host") or ""
    port = option(argv, "--port") or (environ.get(server.port_env) if server.port_env else None)
    if host in _ANY_HOST:
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port or server.default_port}"


def api_key(argv: Sequence[str]) -> str | None:
    """The child's own --api-key, which its clients (and so warmgate) must send."""
    return option(argv, "--api-key")


REDACTED = "<redacted>"
_KEY_FLAG = "--api-key"
# The flag inside a word of its own, as in `sh -c "vllm serve M --api-key KEY"`.
_KEY_IN_SCRIPT = re.compile(r"""(--api[-_]key(?:=|\s+))('[^']*'|"[^"]*"|[^\s'"]+)""")


def _is_key_flag(word: str) -> bool:
    """`--api-key`, as vLLM's parser also takes it: `--api_key`, or cut short (`--api-k`)."""
    flag = word.replace("_", "-")
    return len(flag) >= len("--api-k") and _KEY_FLAG.startswith(flag)


def redacted(argv: Sequence[str]) -> list[str]:
    """`argv` for a log line: every value of `--api-key VALUE` and `--api-key=VALUE` is
    REDACTED, read as `option` reads it (a flag's next word is its value, whatever it is)."""
    shown = list(argv)
    for i, word in enumerate(argv):
        name, eq, _ = word.partition("=")
        if _is_key_flag(name):
            if eq:
                shown[i] = f"{name}={REDACTED}"
            elif i + 1 < len(argv):
                shown[i + 1] = REDACTED
        elif any(c.isspace() for c in word):  # a script; a value already hidden stays so
            shown[i] = _KEY_IN_SCRIPT.sub(lambda m: m.group(1) + REDACTED, shown[i])
    return shown
