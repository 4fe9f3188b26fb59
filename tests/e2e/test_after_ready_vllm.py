"""After Ready, over the real vLLM CPU build (issue #18): sleep and wake, a LoRA adapter
loaded at run time, and the traffic profile carried over to the next start.

The CPU build refuses `--enable-sleep-mode` ("not supported on current platform"), but in
dev mode (VLLM_SERVER_DEV_MODE=1) its /sleep, /wake_up and /is_sleeping pause and resume
the scheduler (freeing nothing): what warmgate watches is all there. Runtime LoRA
(VLLM_ALLOW_RUNTIME_LORA_UPDATING) works on CPU. Two vLLM starts on one --cache-dir; the
tests run in file order and share them.
"""

from __future__ import annotations

import contextlib
import json
import signal
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import vllm_command
from wgutil import Running, free_port, http_get, wait_for

pytestmark = pytest.mark.e2e

MODEL = "tiny-llama"  # scripts/real_vllm.sh's served name and shape: 2 layers, hidden 256
SECRET = "zebra-quartz-umbrella"  # a prompt word that must never reach the profile file
ENV = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


class Group:
    """One --cache-dir and the warmgate+vLLM starts made on it, one after another."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.vllm_port = free_port()
        self.gate: Running | None = None
        self.probe_port = 0

    def start(self) -> None:
        self.gate = Running(
            [
                "run",
                "--host", "127.0.0.1",
                "--port", "0",
                "--cache-dir", str(self.cache),
                "--adapter-interval", "1",
                "--drain-min", "0",
                # With --enable-lora the CPU build's engine died on a chat request with
                # n=2 and prompt_logprobs ("einsum(): subscript b has size 2 ... 41"):
                # warmgate quarantines it, but these tests want a start that serves, so
                # the plan leaves n and prompt_logprobs out.
                "--features", "greedy,sampling,seed,penalties,logprobs,json",
                "--",
                *vllm_command(),
                "--host", "127.0.0.1",
                "--port", str(self.vllm_port),
                "--enable-log-requests",
                "--enable-log-outputs",
                "--enable-lora",
                "--max-lora-rank", "8",
            ],
            env=ENV,
        )  # fmt: skip
        self.probe_port = int(self.gate.wait_event("listening", timeout=60)["port"])

        def answers() -> bool:
            with contextlib.suppress(OSError):  # closed: it is on its way out
                return self.ready() == 200
            return False

        wait_for(lambda: answers() or self.gate.proc.poll() is not None, timeout=900, interval=0.5)
        assert answers(), f"not Ready (exit {self.gate.proc.poll()}):\n{self.gate.stderr[-4000:]}"

    def stop(self) -> int:
        assert self.gate is not None
        self.gate.proc.send_signal(signal.SIGTERM)
        return self.gate.wait(timeout=120)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.vllm_port}"

    def status(self) -> dict[str, Any]:
        code, body = http_get(self.probe_port, "/status")
        assert code == 200
        return dict(body)

    def ready(self) -> int:
        return http_get(self.probe_port, "/ready")[0]


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Group]:
    started = Group(tmp_path_factory.mktemp("cache"))
    started.start()
    try:
        yield started
    finally:
        if started.gate is not None:
            started.gate.stop()


def test_sleep_makes_the_pod_unready_and_wake_up_rewarms_it(group: Group) -> None:
    assert group.status()["phase"] == "ready"
    assert httpx.post(f"{group.base}/sleep?level=1", timeout=30).status_code == 200
    wait_for(lambda: group.ready() == 503, timeout=5, interval=0.05)
    assert group.status()["phase"] == "sleeping"
    assert http_get(group.probe_port, "/live")[0] == 200
    assert httpx.post(f"{group.base}/wake_up", timeout=30).status_code == 200
    wait_for(lambda: group.ready() == 200, timeout=120, interval=0.1)
    assert group.gate is not None
    phases = [e["phase"] for e in group.gate.events("phase")]
    assert phases[-3:] == ["sleeping", "rewarming", "ready"], phases
    rewarm = group.status()["rewarm"]
    assert rewarm["wakes"] == 1 and len(rewarm["shapes"]) >= 1, rewarm


def test_an_adapter_loaded_after_ready_is_warmed(group: Group, tmp_path: Path) -> None:
    path = zero_lora(tmp_path / "sql")
    body = {"lora_name": "sql", "lora_path": str(path)}
    reply = httpx.post(f"{group.base}/v1/load_lora_adapter", json=body, timeout=60)
    assert reply.status_code == 200, reply.text

    def state() -> str | None:
        found = [a for a in group.status()["adapters"] if a["name"] == "sql"]
        return str(found[0]["state"]) if found else None

    wait_for(lambda: state() in ("warm", "failed"), timeout=60, interval=0.2)
    assert state() == "warm"
    assert group.ready() == 200  # the pod stayed in service throughout
    chat = {"model": "sql", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert httpx.post(f"{group.base}/v1/chat/completions", json=chat, timeout=60).is_success


def test_the_next_start_warms_the_learned_traffic_first(group: Group) -> None:
    replay_mix(group.base)
    assert group.stop() == 0
    files = list((group.cache / "profiles").glob("*/*.json"))
    assert len(files) == 1, files
    text = files[0].read_text()
    assert SECRET not in text  # shapes, never content
    learned = json.loads(text)
    assert any("logprobs" in c["feature"] and "json" in c["feature"] for c in learned["combos"])

    group.start()  # the same served arguments: the same profile key
    status = group.status()
    assert status["profile"]["loaded"]["requests"] >= 18, status["profile"]
    sources = [s["source"] for s in status["shapes"]]
    first_other = next(i for i, s in enumerate(sources) if s != "profile")
    assert first_other > 0 and "profile" not in sources[first_other:], sources
    top = status["shapes"][0]
    assert {"logprobs", "json"} <= set(top["feature"].replace(",", "+").split("+")), top


def replay_mix(base: str) -> None:
    """What one client sends: streamed chat asking for JSON and logprobs, three lengths."""
    with httpx.Client(timeout=120) as client:
        for n in range(18):
            words = (10, 60, 250)[n % 3]  # up to ~1,300 tokens: within the 2,048 context
            prompt = " ".join([SECRET] + [f"w{n}x{i}" for i in range(words)])
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": prompt}],
                "response_format": {"type": "json_object"},
                "logprobs": True,
                "top_logprobs": 2,
                "temperature": 0.7,
                "stream": True,
                "max_tokens": 4,
            }
            with client.stream("POST", f"{base}/v1/chat/completions", json=body) as reply:
                assert reply.status_code == 200, reply.read()[:500]
                assert "[DONE]" in "".join(reply.iter_text())


def zero_lora(directory: Path) -> Path:
    """A rank-8 LoRA adapter of zeros on q_proj and v_proj of the model's 2 layers: PEFT's
    adapter_config.json and a safetensors file, written by hand (no torch here)."""
    directory.mkdir(parents=True)
    config = {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "base_model_name_or_path": MODEL,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    shapes = {}
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            name = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            shapes[f"{name}.lora_A.weight"] = (8, 256)
            shapes[f"{name}.lora_B.weight"] = (256, 8)
    header: dict[str, Any] = {}
    offset = 0
    for name, (rows, cols) in shapes.items():
        size = rows * cols * 2  # bfloat16
        header[name] = {
            "dtype": "BF16",
            "shape": [rows, cols],
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    data = struct.pack("<Q", len(raw)) + raw + bytes(offset)
    (directory / "adapter_model.safetensors").write_bytes(data)
    return directory
