"""The held-out request mix for the warm-up benchmark.

`heldout.jsonl` holds requests written from what real clients send, independently of
the warm-up plan (plan.py never reads it), so the benchmark measures whether the plan
warms what traffic actually hits. `json_logprobs_stream.jsonl` is a narrow mix the
default plan covers poorly (streamed chat asking for JSON and logprobs together, at
three lengths): the traffic a learned profile is for (`--mix`). Each line:

    {"name": ..., "endpoint": "/v1/chat/completions" | "/v1/completions",
     "body": {...}, "prompt_tokens": N, "concurrency": C (optional, default 1)}

The body has no "model", and its prompt is the marker "{{prompt}}" (a whole string
value: a message's content or the completions prompt). The runner fills it with fresh
text of about `prompt_tokens` tokens, so the same request can be sent cold and again
warm without the prefix cache answering. Every request fits a 2048-token context.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from warmgate.options import BENCH_MIXES

__all__ = ["HELDOUT_CONTEXT", "MIXES", "PROMPT_MARKER", "HeldoutRequest", "load_heldout"]

PROMPT_MARKER = "{{prompt}}"
HELDOUT_CONTEXT = 2048  # every request fits this max_model_len, max_tokens included
MIXES = BENCH_MIXES  # the .jsonl files here


@dataclass(frozen=True)
class HeldoutRequest:
    name: str
    endpoint: str
    body: dict[str, Any] = field(hash=False)
    prompt_tokens: int
    concurrency: int = 1

    @property
    def max_tokens(self) -> int:
        return int(self.body.get("max_tokens") or self.body.get("max_completion_tokens") or 0)

    def render(self, prompt: str | list[int], model: str) -> dict[str, Any]:
        """The body to send: the marker replaced by `prompt`, `model` filled in."""
        body: dict[str, Any] = _replace(copy.deepcopy(self.body), prompt)
        body["model"] = model
        return body


def _replace(value: Any, prompt: str | list[int]) -> Any:
    if value == PROMPT_MARKER:
        return prompt
    if isinstance(value, dict):
        return {k: _replace(v, prompt) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace(v, prompt) for v in value]
    return value


def load_heldout(mix: str = BENCH_MIXES[0]) -> list[HeldoutRequest]:
    """Every request of the mix's file (MIXES), in file order."""
    name = f"{mix}.jsonl"
    text = resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
    requests = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            request = HeldoutRequest(
                record["name"],
                record["endpoint"],
                record["body"],
                int(record["prompt_tokens"]),
                int(record.get("concurrency", 1)),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{name}:{n}: bad request ({e})") from None
        if PROMPT_MARKER not in json.dumps(request.body):
            raise ValueError(f"{name}:{n}: body has no {PROMPT_MARKER} marker")
        requests.append(request)
    return requests
