"""The scanners fed by the output pumps: whole lines, per stream, whatever the pipe reads."""

from __future__ import annotations

from test_engineconfig import REAL_CPU_LINE

from warmgate.childlog import JIT_MARKER, EngineConfigScanner, JitScanner, LineScanner
from warmgate.engineconfig import from_log

STDOUT, STDERR = 1, 2
JIT_LINE = b"WARNING [jit_monitor.py:80] Triton kernel JIT compilation during inference: k\n"


def test_the_config_line_in_odd_chunks_across_two_streams() -> None:
    line = REAL_CPU_LINE.encode() + b"\n"
    scanner = EngineConfigScanner()
    scanner.feed(STDOUT, b"INFO loading weights\n" + line[:1000])
    scanner.feed(STDERR, b"(APIServer pid=1) INFO half a line from the other stre")
    scanner.feed(STDOUT, line[1000:3333])
    assert scanner.line is None  # not finished yet
    scanner.feed(STDERR, b"am\nINFO more\n")
    scanner.feed(STDOUT, line[3333:] + b"INFO Starting vLLM API server\n")
    assert scanner.line == REAL_CPU_LINE
    assert from_log(scanner.line)["step_budget"] == 2048


def test_a_config_line_longer_than_4_kib() -> None:
    sizes = ", ".join(map(str, [1, 2, 4, *range(8, 256, 8), *range(256, 513, 16)]))
    long = REAL_CPU_LINE.replace(
        "'cudagraph_capture_sizes': []", f"'cudagraph_capture_sizes': [{sizes}]"
    )
    long = long.replace("'compile_sizes': None", f"'compile_sizes': [{sizes}]")
    long = long.replace("/models/tiny", "/models/" + "m" * 1000)  # model and tokenizer: ~6 KB
    assert len(long) > LineScanner.kept_bytes + 1500  # more than a JitScanner keeps
    scanner = EngineConfigScanner()
    data = long.encode() + b"\n"
    for start in range(0, len(data), 1500):
        scanner.feed(STDERR, data[start : start + 1500])
    assert scanner.line == long
    assert from_log(long)["compile_sizes"][-1] == 512


def test_the_first_config_line_is_kept() -> None:
    scanner = EngineConfigScanner()
    second = REAL_CPU_LINE.replace("max_seq_len=2048", "max_seq_len=4096")
    scanner.feed(STDERR, f"{REAL_CPU_LINE}\n{second}\n".encode())
    scanner.feed(STDERR, f"{second}\n".encode())
    assert scanner.line == REAL_CPU_LINE


def test_a_config_line_that_is_not_utf8() -> None:
    scanner = EngineConfigScanner()
    scanner.feed(STDOUT, b"\xff " + REAL_CPU_LINE.encode() + b"\n")
    assert scanner.line is not None
    assert scanner.line.startswith("\ufffd ")
    assert from_log(scanner.line)["max_model_len"] == 2048


def test_only_the_config_scanner_keeps_long_lines() -> None:
    assert (LineScanner.kept_bytes, JitScanner.kept_bytes) == (4096, 4096)
    assert EngineConfigScanner.kept_bytes == 64 * 1024
    # a marker past the first 4 KiB of an unfinished line is cut off for the JIT scanner
    jit = JitScanner()
    jit.feed(STDOUT, b"x" * 4100 + JIT_MARKER)
    jit.feed(STDOUT, b"\n")
    assert jit.total == 0
    # and kept for the config scanner, up to 64 KiB
    config = EngineConfigScanner()
    config.feed(STDOUT, b"x" * 60_000 + b" Initializing a V1 LLM engine")
    config.feed(STDOUT, b" (v0.32.0)\n")
    assert config.line is not None
    assert config.line.endswith("engine (v0.32.0)")


def test_the_jit_scanner_counts_whole_lines_and_those_after_ready() -> None:
    jit = JitScanner()
    jit.feed(STDERR, JIT_LINE[:20])
    jit.feed(STDOUT, JIT_LINE)
    jit.feed(STDERR, JIT_LINE[20:])
    assert (jit.total, jit.after_ready) == (2, 0)
    jit.ready = True
    jit.feed(STDOUT, JIT_LINE * 3)
    assert (jit.total, jit.after_ready) == (5, 3)
