"""LoRA adapters, as vLLM 0.32's OpenAIServingModels keeps them. No I/O but a path check.

Adapters come from `--lora-modules name=path` at start, and at run time from
`POST /v1/load_lora_adapter` / `POST /v1/unload_lora_adapter`, which exist only when
VLLM_ALLOW_RUNTIME_LORA_UPDATING is 1 or true. Every adapter needs `--enable-lora`: without
it vLLM's worker refuses the load with a 500. A request names an adapter as its `model`;
`/v1/models` lists each after the base model, with `root` its path and `parent` the base.
Messages, types and codes follow vllm/entrypoints/openai/models/serving.py.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from warmgate.sim.api import ApiError, request_error
from warmgate.sim.settings import SettingsError


@dataclass(frozen=True, slots=True)
class Adapter:
    name: str
    int_id: int  # vLLM's lora_int_id: 1, 2, ... in load order; a reload keeps its id
    path: str
    base_model_name: str | None = None

    def request_repr(self) -> str:
        """vLLM's LoRARequest repr (a msgspec Struct), as its request log prints it."""
        return (
            f"LoRARequest(lora_name={self.name!r}, lora_int_id={self.int_id}, "
            f"lora_path={self.path!r}, base_model_name={self.base_model_name!r}, "
            "load_inplace=False, is_3d_lora_weight=False)"
        )


def parse_module(text: str) -> tuple[str, str]:
    """`--lora-modules name=path` -> (name, path). vLLM loads these at start, and fails
    to start when one is missing."""
    name, sep, path = text.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
        raise SettingsError(f"--lora-modules {text!r}: expected name=path")
    if not os.path.isdir(path):
        raise SettingsError(f"--lora-modules {text!r}: {not_found(name, path)} (not a directory)")
    return name, path


def not_found(name: str, path: str) -> str:
    return f"Loading lora {name} failed: No adapter found for {path}"


def sanitize(message: str) -> str:
    """vLLM's sanitize_message: an error answered to a client names no file path."""
    message = _SYSTEM_PATH.sub("<path>", message)
    return _FILE_PATH.sub("<path>", message).strip()


_SYSTEM_PATH = re.compile(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+")
_FILE_PATH = re.compile(r"(?:/[\w\-]+)+/[\w\-]+\.\w+")


class Adapters:
    """The adapters loaded, by name."""

    def __init__(self, base_model: str, enabled: bool) -> None:
        self._base = base_model
        self._enabled = enabled
        self._loaded: dict[str, Adapter] = {}
        self._last_id = 0

    def __contains__(self, name: object) -> bool:
        return name in self._loaded

    def get(self, name: str) -> Adapter | None:
        return self._loaded.get(name)

    def names(self) -> frozenset[str]:
        return frozenset(self._loaded)

    def all(self) -> list[Adapter]:
        return list(self._loaded.values())

    def check_load(self, body: dict[str, object]) -> tuple[str, str]:
        """Validate a load request as vLLM does before it touches the engine: (name, path)."""
        name, path = _required(body, "lora_name"), _required(body, "lora_path")
        inplace = body.get("load_inplace") is True
        if not name or not path:
            raise _invalid("Both 'lora_name' and 'lora_path' must be provided.")
        if name == self._base:
            raise _invalid(f"The lora adapter '{name}' conflicts with a served base model.")
        if not inplace and name in self._loaded:
            raise _invalid(
                f"The lora adapter '{name}' has already been loaded. If you want to load "
                "the adapter in place, set 'load_inplace' to True."
            )
        return name, path

    def add(self, name: str, path: str) -> Adapter:
        """The engine's part: refuse without --enable-lora or without the files. vLLM
        takes the next id before it asks the engine, so a failed load uses one up."""
        previous = self._loaded.get(name)
        if previous is None:
            self._last_id += 1
        int_id = previous.int_id if previous else self._last_id
        if not self._enabled:
            raise ApiError(
                "LoRA is not enabled. Use --enable-lora to enable LoRA.",
                status=500,
                err_type="InternalServerError",
            )
        if not os.path.isdir(path):
            message = sanitize(not_found(name, path))
            raise ApiError(message, status=404, err_type="NotFoundError")
        adapter = Adapter(name, int_id, path)
        self._loaded[name] = adapter
        return adapter

    def remove(self, body: dict[str, object]) -> str:
        name = _required(body, "lora_name")
        if not name:
            raise _invalid("'lora_name' needs to be provided to unload a LoRA adapter.")
        if name not in self._loaded:
            raise ApiError(
                f"The lora adapter '{name}' cannot be found.",
                status=404,
                err_type="NotFoundError",
            )
        del self._loaded[name]
        return name


def _required(body: dict[str, object], key: str) -> str:
    """A required string field, with pydantic's error when it is missing or not a string."""
    if key not in body:
        raise request_error(f"body.{key}", "missing", "Field required", body)
    value = body[key]
    if not isinstance(value, str):
        raise request_error(f"body.{key}", "string_type", "Input should be a valid string", value)
    return value


def _invalid(message: str) -> ApiError:
    return ApiError(message, err_type="InvalidUserInput")
