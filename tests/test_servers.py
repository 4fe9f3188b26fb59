"""Recognising a known model server in the child's command line (pure)."""

from __future__ import annotations

import pytest

from warmgate.servers import REDACTED, api_key, option, redacted, upstream_url


@pytest.mark.parametrize(
    ("argv", "url"),
    [
        (["vllm", "serve", "m"], "http://127.0.0.1:8000"),
        (["/usr/local/bin/vllm", "serve", "m", "--port", "9000"], "http://127.0.0.1:9000"),
        (["vllm", "serve", "m", "--host=10.1.2.3", "--port=9001"], "http://10.1.2.3:9001"),
        (["vllm", "serve", "m", "--host", "0.0.0.0"], "http://127.0.0.1:8000"),
        (["vllm", "serve", "m", "--host", "::1"], "http://[::1]:8000"),
        (
            [
                "python3",
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                "d",
                "--port",
                "18000",
            ],
            "http://127.0.0.1:18000",
        ),
        (["warmgate", "sim", "--port", "8100"], "http://127.0.0.1:8100"),
        (["/venv/bin/python", "-m", "warmgate", "sim"], "http://127.0.0.1:8000"),
        (["python", "-m", "sglang.launch_server", "--model-path", "m"], "http://127.0.0.1:30000"),
        (["sleep", "10"], None),
        (["sh", "-c", "vllm serve m"], None),  # not ours to parse: use --upstream
        ([], None),
    ],
)
def test_upstream_url(argv: list[str], url: str | None) -> None:
    assert upstream_url(argv, {}) == url


def test_sim_port_from_its_environment_variable() -> None:
    assert (
        upstream_url(["warmgate", "sim"], {"WARMGATE_SIM_PORT": "8123"}) == "http://127.0.0.1:8123"
    )
    assert (
        upstream_url(["warmgate", "sim", "--port", "1"], {"WARMGATE_SIM_PORT": "8123"})
        == "http://127.0.0.1:1"
    )


def test_last_option_wins_and_api_key() -> None:
    argv = ["vllm", "serve", "m", "--port", "1", "--port=2", "--api-key", "s3cret"]
    assert option(argv, "--port") == "2"
    assert api_key(argv) == "s3cret"
    assert api_key(["vllm", "serve", "m"]) is None


KEY = "sk-s3cret"


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["vllm", "serve", "m", "--api-key", KEY], ["vllm", "serve", "m", "--api-key", REDACTED]),
        (["vllm", "serve", f"--api-key={KEY}", "m"], ["vllm", "serve", f"--api-key={REDACTED}", "m"]),
        # every occurrence, and the next word whatever it looks like, as option() reads it
        (["--api-key", "--api-key", KEY], ["--api-key", REDACTED, REDACTED]),
        (["--api-key", "x y", "--api-key=", "--port", "1"],
         ["--api-key", REDACTED, f"--api-key={REDACTED}", "--port", "1"]),
        # as vLLM's parser also takes the flag: underscores, cut short
        (["--api_key", KEY, f"--api-k={KEY}"], ["--api_key", REDACTED, f"--api-k={REDACTED}"]),
        # inside a shell script given as one word
        (["sh", "-c", f"exec vllm serve m --api-key {KEY} --port 2"],
         ["sh", "-c", f"exec vllm serve m --api-key {REDACTED} --port 2"]),
        (["sh", "-c", f"vllm serve m --api_key='{KEY} x'"],
         ["sh", "-c", f"vllm serve m --api_key={REDACTED}"]),
        # nothing else changes, a dangling flag included
        (["vllm", "serve", "m", "--api-server-count", "2", "--api", "x", "--api-key"],
         ["vllm", "serve", "m", "--api-server-count", "2", "--api", "x", "--api-key"]),
    ],
)  # fmt: skip
def test_redacted_hides_every_api_key_value(argv: list[str], shown: list[str]) -> None:
    assert redacted(argv) == shown
    assert redacted(tuple(argv)) == shown and KEY not in " ".join(redacted(argv))
