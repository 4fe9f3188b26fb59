"""vLLM's OpenAI-compatible requests: validation, and the tokenizer endpoints.
(Response JSON lives in `responses`.)

No I/O here. Shapes, messages and status codes follow captures of the real vLLM 0.32
CPU server. Validation runs in vLLM's order:
1. request parsing (FastAPI/pydantic): 400, type "Bad Request", param "body.<field>";
2. the model name: 404 NotFoundError;
3. prompt length against max_model_len, then max_tokens is clamped to what is left;
4. sampling parameters: 400 BadRequestError, "... (parameter=X, value=V)".
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from warmgate.sim.costs import Features
from warmgate.sim.generate import SamplingSpec
from warmgate.sim.requestlog import STRUCTURED_FIELDS, LoggedParams
from warmgate.sim.tokenizer import BOS, Tokenizer, render_chat

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
MAX_STOP_STRINGS = 4  # vLLM's default VLLM_MAX_STOP_STRINGS
_SAMPLING_EPS = 1e-5  # below this temperature vLLM samples greedily
_MIN_TEMPERATURE = 1e-2  # vLLM raises a smaller positive temperature to this
_INT64 = 2**63
_NO_VALUE = object()
_JSON_TYPES = {"string", "number", "integer", "boolean", "object", "array", "null"}


class ApiError(Exception):
    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        err_type: str = "BadRequestError",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.err_type = err_type
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.err_type, self.status, self.param)


def error_body(
    message: str, err_type: str, status: int, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def invalid(message: str, param: str | None, value: Any = _NO_VALUE) -> ApiError:
    """vLLM's VLLMValidationError: the parameter (and value) are appended to the message."""
    if param is None:
        return ApiError(message)
    shown = "" if value is _NO_VALUE else f", value={value}"
    return ApiError(f"{message} (parameter={param}{shown})", param=param)


def request_error(loc: str, kind: str, msg: str, value: Any, ctx: Any = None) -> ApiError:
    """A FastAPI request-validation error as vLLM renders it (type "Bad Request")."""
    return request_errors([error_detail(loc, kind, msg, value, ctx)])


def request_errors(details: Sequence[dict[str, Any]]) -> ApiError:
    """Several pydantic errors (each branch of a union fails); param is the first's loc."""
    label = "error" if len(details) == 1 else "errors"
    lines = "".join(f"\n  {detail!r}" for detail in details)
    message = f"{len(details)} validation {label}:{lines}"
    return ApiError(message, err_type="Bad Request", param=details[0]["loc"])


def error_detail(loc: str, kind: str, msg: str, value: Any, ctx: Any = None) -> dict[str, Any]:
    detail: dict[str, Any] = {"type": kind, "loc": loc, "msg": msg, "input": _summary(value)}
    if ctx is not None:
        detail["ctx"] = ctx
    return detail


def _summary(value: Any) -> str:
    """vLLM's `_summarize_error_input`: containers by size, anything else as str()."""
    if isinstance(value, dict | list):
        return f"<{type(value).__name__} of {len(value)} items>"
    return str(value)


def parse_body(body: bytes, content_type: str | None) -> Any:
    """The JSON object of a POST body, checked as vLLM's `validate_json_request` does."""
    if (content_type or "").split(";", 1)[0].strip().lower() != "application/json":
        raise ApiError(
            "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
            err_type="Bad Request",
        )
    if not body.strip():
        raise request_error("body", "missing", "Field required", None)
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        pos = exc.pos if isinstance(exc, json.JSONDecodeError) else exc.start
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "invalid UTF-8"
        raise request_error(
            f"body.{pos}", "json_invalid", "JSON decode error", {}, {"error": msg}
        ) from None
    if not isinstance(value, dict):
        raise request_error(
            "body",
            "model_attributes_type",
            "Input should be a valid dictionary or object to extract fields from",
            value,
        )
    return value


@dataclass(frozen=True, slots=True)
class Context:
    model: str
    max_model_len: int
    tokenizer: Tokenizer
    adapters: frozenset[str] = frozenset()  # LoRA adapters a request may name as its model

    def unknown_model(self, name: str) -> ApiError:
        return ApiError(
            f"The model `{name}` does not exist. Valid aliases: {self.model}.",
            status=404,
            err_type="NotFoundError",
            param="model",
        )


@dataclass(frozen=True, slots=True)
class Prompt:
    ids: list[int]
    text: str | None  # None when the client sent token ids


@dataclass(frozen=True, slots=True)
class Generation:
    """A validated /v1/completions or /v1/chat/completions request."""

    chat: bool
    model: str
    prompts: tuple[Prompt, ...]
    specs: tuple[SamplingSpec, ...]  # one per prompt: max_tokens depends on its length
    n: int
    stream: bool
    include_usage: bool
    continuous_usage: bool  # stream_options.continuous_usage_stats: usage on every chunk
    echo: bool  # completions: the prompt text goes before the output
    chat_echo: str  # chat: the last message's content, when it goes before the output
    reply_role: str  # chat: "assistant", or the last message's role without a generation prompt
    logprobs: int | None  # top logprobs per output token; None when not asked for
    prompt_logprobs: int | None
    return_token_ids: bool
    features: Features
    params: LoggedParams  # what vLLM's request log prints as SamplingParams
    lora: str | None = None  # the adapter named as the model


# -- reading fields ---------------------------------------------------------------------


class _Fields:
    """Typed access to the request object, lax the way pydantic is ("5" is an int)."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def get(self, name: str) -> Any:
        return self.body.get(name)

    def integer(self, name: str, default: int | None = None) -> int | None:
        value = self.body.get(name)
        if value is None:
            return default
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            if value.is_integer():
                return int(value)
            raise self._error(
                name, "int_from_float", "a valid integer, got a number with a fractional part"
            )
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise self._error(
                    name, "int_parsing", "a valid integer, unable to parse string as an integer"
                ) from None
        raise self._error(name, "int_type", "a valid integer")

    def number(self, name: str, default: float | None = None) -> float | None:
        value = self.body.get(name)
        if value is None:
            return default
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise self._error(
                    name, "float_parsing", "a valid number, unable to parse string as a number"
                ) from None
        raise self._error(name, "float_type", "a valid number")

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.body.get(name)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        raise self._error(name, "bool_parsing", "a valid boolean, unable to interpret input")

    def string(self, name: str) -> str | None:
        value = self.body.get(name)
        if value is not None and not isinstance(value, str):
            raise self._error(name, "string_type", "a valid string")
        return value

    def int_list(self, name: str) -> list[int]:
        value = self.body.get(name) or []
        if not isinstance(value, list):
            raise self._error(name, "list_type", "a valid list")
        for index, item in enumerate(value):
            if not _is_int(item):
                raise request_error(
                    f"body.{name}.{index}", "int_type", "Input should be a valid integer", item
                )
        return value

    def stop(self) -> tuple[str, ...]:
        value = self.body.get("stop")
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        # `str | list[str]` (at most VLLM_MAX_STOP_STRINGS): pydantic reports both branches.
        errors = [error_detail("body.stop", "string_type", "Input should be a valid string", value)]
        if not isinstance(value, list):
            errors.append(
                error_detail("body.stop", "list_type", "Input should be a valid list", value)
            )
        elif len(value) > MAX_STOP_STRINGS:
            errors.append(
                error_detail(
                    "body.stop",
                    "too_long",
                    f"List should have at most {MAX_STOP_STRINGS} items after validation, "
                    f"not {len(value)}",
                    value,
                    {
                        "field_type": "List",
                        "max_length": MAX_STOP_STRINGS,
                        "actual_length": len(value),
                    },
                )
            )
        else:
            errors += [
                error_detail(f"body.stop.{i}", "string_type", "Input should be a valid string", v)
                for i, v in enumerate(value)
                if not isinstance(v, str)
            ]
        if len(errors) > 1:
            raise request_errors(errors)
        return tuple(value)

    def _error(self, name: str, kind: str, expected: str) -> ApiError:
        return request_error(f"body.{name}", kind, f"Input should be {expected}", self.get(name))


_BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- generation requests ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Common:
    """What vLLM checks while parsing a request body, before the model name."""

    stream: bool
    include_usage: bool
    continuous_usage: bool
    prompt_logprobs: int | None
    json_mode: str | None
    json_schema: Mapping[str, Any] | None
    max_tokens: int | None


def parse_completion(body: dict[str, Any], ctx: Context) -> Generation:
    f = _Fields(body)
    raw_prompts = _completion_prompts(f.get("prompt"))
    logprobs = f.integer("logprobs")
    if logprobs is not None and logprobs < 0 and logprobs != -1:
        raise invalid("`logprobs` must be a positive value or -1.", "logprobs", logprobs)
    common = _common(f, f.integer("max_tokens"))
    _check_model(f, ctx)
    add_special = f.boolean("add_special_tokens", True)
    prompts = tuple(_encode_prompt(p, ctx, add_special) for p in raw_prompts)
    return _generation(f, ctx, False, prompts, logprobs, common)


def parse_chat(body: dict[str, Any], ctx: Context) -> Generation:
    f = _Fields(body)
    if "messages" not in body:
        raise request_error("body.messages", "missing", "Field required", body)
    messages = _chat_messages(f.get("messages"))
    top = f.integer("top_logprobs")
    wants_logprobs = f.boolean("logprobs")
    if top is not None and top > 0 and not wants_logprobs:
        raise invalid("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
    if top is not None and top < 0 and top != -1:
        raise invalid("`top_logprobs` must be a positive value or -1.", "top_logprobs", top)
    common = _common(f, f.integer("max_completion_tokens") or f.integer("max_tokens"))
    _check_tools(f)
    _check_model(f, ctx)
    text = render_chat(messages, f.boolean("add_generation_prompt", True))
    ids = ctx.tokenizer.encode(text)
    if f.boolean("add_special_tokens"):
        ids = [BOS, *ids]
    _check_length(ids, ctx, text_prompt=True)
    logprobs = (top or 0) if wants_logprobs else None
    if f.boolean("echo") and common.prompt_logprobs is None:
        common = dataclasses.replace(common, prompt_logprobs=top or 0)
    return _generation(f, ctx, True, (Prompt(ids, text),), logprobs, common, messages)


def _common(f: _Fields, max_tokens: int | None) -> _Common:
    stream = f.boolean("stream")
    options = f.get("stream_options")
    if options and not stream:
        raise invalid("Stream options can only be defined when `stream=True`.", "stream_options")
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    continuous = include_usage and bool(options.get("continuous_usage_stats"))
    prompt_logprobs = f.integer("prompt_logprobs")
    if prompt_logprobs is not None:
        if stream and (prompt_logprobs > 0 or prompt_logprobs == -1):
            raise invalid(
                "`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs"
            )
        if prompt_logprobs < 0 and prompt_logprobs != -1:
            raise invalid(
                "`prompt_logprobs` must be a positive value or -1.",
                "prompt_logprobs",
                prompt_logprobs,
            )
    json_mode, json_schema = _structured_output(f)
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty"):
        f.number(name)
    f.number("repetition_penalty")
    for name in ("top_k", "n", "min_tokens"):
        f.integer(name)
    _check_seed(f.integer("seed"))
    f.stop()
    f.int_list("stop_token_ids")
    for name in ("ignore_eos", "echo", "include_stop_str_in_output", "return_token_ids"):
        f.boolean(name)
    return _Common(
        stream, include_usage, continuous, prompt_logprobs, json_mode, json_schema, max_tokens
    )


def _check_seed(seed: int | None) -> None:
    """pydantic's `Field(ge=-2**63, le=2**63 - 1)` on `seed`."""
    if seed is None or -_INT64 <= seed < _INT64:
        return
    if seed < 0:
        kind, word, bound = "greater_than_equal", "greater", -_INT64
        ctx = {"ge": bound}
    else:
        kind, word, bound = "less_than_equal", "less", _INT64 - 1
        ctx = {"le": bound}
    raise request_error(
        "body.seed", kind, f"Input should be {word} than or equal to {bound}", seed, ctx
    )


def _structured_output(f: _Fields) -> tuple[str | None, Mapping[str, Any] | None]:
    fmt = f.get("response_format")
    structured = f.get("structured_outputs")
    if isinstance(structured, dict) and isinstance(structured.get("json"), dict):
        return "schema", _checked_schema(structured["json"])
    if fmt is None:
        return None, None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        expected = "'text', 'json_object' or 'json_schema'"
        raise request_error(
            "body.response_format.type",
            "literal_error",
            f"Input should be {expected}",
            kind,
            {"expected": expected},
        )
    assert isinstance(fmt, dict)
    if kind == "text":
        return None, None
    if kind == "json_object":
        return "object", None
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid(
            "When response_format type is 'json_schema', the 'json_schema' field must be provided.",
            "response_format",
        )
    schema = spec.get("schema")
    return "schema", _checked_schema(schema if isinstance(schema, dict) else {})


def _checked_schema(schema: Mapping[str, Any]) -> Mapping[str, Any]:
    """The grammar compiler's complaint about an unknown JSON-schema type, as xgrammar's."""
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            kind = node.get("type")
            if isinstance(kind, str) and kind not in _JSON_TYPES:
                raise ApiError(f"Grammar error: Invalid type: {kind}")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return schema


def _check_tools(f: _Fields) -> None:
    if f.get("tools") and f.get("tool_choice") == "auto":
        raise ApiError(
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
        )


def _check_model(f: _Fields, ctx: Context) -> None:
    model = f.string("model")
    if model is not None and model != ctx.model and model not in ctx.adapters:
        raise ctx.unknown_model(model)


def _completion_prompts(prompt: Any) -> list[str | list[int]]:
    """`prompt: list[int>=0] | list[list[int>=0]] | str | list[str]`, validated as
    pydantic's smart union does: a strict match first, then the lax int branches."""
    if prompt is None or prompt == "" or prompt == []:
        raise invalid("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    loc = "body.prompt"
    flat_errors, flat = _token_ids(loc, prompt)
    if not flat_errors:
        return [flat]
    nested_errors: list[dict[str, Any]] = []
    nested: list[str | list[int]] = []
    if not isinstance(prompt, list):
        nested_errors.append(error_detail(loc, "list_type", "Input should be a valid list", prompt))
    else:
        for index, item in enumerate(prompt):
            item_errors, ids = _token_ids(f"{loc}.{index}", item)
            nested_errors += item_errors
            nested.append(ids)
    if not nested_errors:
        return nested
    string_errors = [error_detail(loc, "string_type", "Input should be a valid string", prompt)]
    if isinstance(prompt, list):
        string_errors += [
            error_detail(f"{loc}.{i}", "string_type", "Input should be a valid string", p)
            for i, p in enumerate(prompt)
            if not isinstance(p, str)
        ]
    else:
        string_errors.append(error_detail(loc, "list_type", "Input should be a valid list", prompt))
    raise request_errors([*flat_errors, *nested_errors, *string_errors])


def _token_ids(loc: str, value: Any) -> tuple[list[dict[str, Any]], list[int]]:
    """`list[int>=0]` in pydantic's lax mode (true, 2.0 and "2" are ints): errors, ids."""
    if not isinstance(value, list):
        return [error_detail(loc, "list_type", "Input should be a valid list", value)], []
    errors, ids = [], []
    for index, item in enumerate(value):
        where = f"{loc}.{index}"
        try:
            token_id = _lax_int(item)
        except ValueError as exc:
            kind, msg = exc.args
            errors.append(error_detail(where, kind, msg, item))
            continue
        if token_id < 0:
            msg = "Input should be greater than or equal to 0"
            errors.append(error_detail(where, "greater_than_equal", msg, item, {"ge": 0}))
        ids.append(token_id)
    return errors, ids


def _lax_int(value: Any) -> int:
    """pydantic's lax int; ValueError(error type, message) when it is not one."""
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ValueError(
            "int_from_float", "Input should be a valid integer, got a number with a fractional part"
        )
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise ValueError(
                "int_parsing",
                "Input should be a valid integer, unable to parse string as an integer",
            ) from None
    raise ValueError("int_type", "Input should be a valid integer")


def _chat_messages(messages: Any) -> list[tuple[str, str]]:
    if messages is None:
        raise request_error("body.messages", "missing", "Field required", None)
    if not isinstance(messages, list):
        raise request_error("body.messages", "list_type", "Input should be a valid list", messages)
    out: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            # pydantic reports the first member of vLLM's message union that failed.
            loc = f"body.messages.{index}.ChatCompletionDeveloperMessageParam.role"
            raise request_error(loc, "missing", "Field required", message)
        out.append((message["role"], _message_text(index, message.get("content"))))
    return out


def _message_text(index: int, content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    loc = f"body.messages.{index}.content"
    raise request_error(loc, "string_type", "Input should be a valid string", content)


def _encode_prompt(prompt: str | list[int], ctx: Context, add_special: bool) -> Prompt:
    if isinstance(prompt, str):
        ids = ctx.tokenizer.encode(prompt)
        ids = [BOS, *ids] if add_special else ids
        _check_length(ids, ctx, text_prompt=True)
        return Prompt(ids, prompt)
    if not prompt:
        raise ApiError("The decoder prompt cannot be empty")
    for token_id in prompt:
        if not 0 <= token_id < ctx.tokenizer.vocab_size:
            raise ApiError(f"Token id {token_id} is out of vocabulary")
    _check_length(prompt, ctx, text_prompt=False)
    return Prompt(list(prompt), None)


def _check_length(ids: Sequence[int], ctx: Context, text_prompt: bool) -> None:
    limit = ctx.max_model_len
    if len(ids) <= limit:
        return
    # vLLM tokenises text with truncation at limit + 1, so it only knows "at least".
    count = f"at least {limit + 1}" if text_prompt else str(len(ids))
    raise invalid(
        f"This model's maximum context length is {limit} tokens. However, your prompt "
        f"contains {count} input tokens, which exceeds this limit even without any output "
        "tokens. Please reduce the length of the input prompt.",
        "input_tokens",
        limit + 1 if text_prompt else len(ids),
    )


def _generation(
    f: _Fields,
    ctx: Context,
    chat: bool,
    prompts: tuple[Prompt, ...],
    logprobs: int | None,
    common: _Common,
    messages: Sequence[tuple[str, str]] = (),
) -> Generation:
    requested = common.max_tokens
    if requested is not None and requested > ctx.max_model_len:
        raise invalid(
            f"max_tokens={requested} cannot be greater than max_model_len={ctx.max_model_len}. "
            "Please request fewer output tokens.",
            "max_tokens",
            requested,
        )
    n = f.integer("n", 1)
    assert n is not None
    if n < 1:  # vLLM's SamplingParams checks n first
        raise invalid(f"n must be at least 1, got {n}.", None)
    specs = tuple(_spec(f, ctx, p, requested, common) for p in prompts)
    vocab = ctx.tokenizer.vocab_size
    logprobs = vocab if logprobs == -1 else logprobs  # -1 asks for the whole vocabulary
    if logprobs is not None and logprobs > MAX_LOGPROBS:
        raise invalid(
            f"Requested sample logprobs of {logprobs}, which is greater than max allowed: "
            f"{MAX_LOGPROBS}",
            "logprobs",
            logprobs,
        )
    echo = f.boolean("echo") and not chat
    prompt_logprobs = common.prompt_logprobs
    if prompt_logprobs is None and echo:
        prompt_logprobs = logprobs  # vLLM scores an echoed prompt with the same k
    prompt_logprobs = vocab if prompt_logprobs == -1 else prompt_logprobs
    if prompt_logprobs is not None and prompt_logprobs > MAX_LOGPROBS:
        raise invalid(
            f"Requested prompt logprobs of {prompt_logprobs}, which is greater than max "
            f"allowed: {MAX_LOGPROBS}",
            "prompt_logprobs",
            prompt_logprobs,
        )
    temperature = specs[0].temperature
    model = f.string("model")
    lora = model if model is not None and model in ctx.adapters else None
    features = Features(
        sampling=_sampling_path(f, temperature),
        penalties=_has_penalties(f),
        seeded=f.get("seed") is not None and temperature >= _SAMPLING_EPS,
        logprobs=logprobs is not None,
        prompt_logprobs=prompt_logprobs is not None,
        grammar=_grammar_key(common),
        chat=chat,
        stream=common.stream,
        n=n,
        lora=lora,
    )
    return Generation(
        chat=chat,
        model=lora or ctx.model,
        prompts=prompts,
        specs=specs,
        n=n,
        stream=common.stream,
        include_usage=common.include_usage,
        continuous_usage=common.continuous_usage,
        echo=echo,
        chat_echo=_chat_echo(f, messages) if chat else "",
        reply_role=_reply_role(f, messages),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        return_token_ids=f.boolean("return_token_ids"),
        features=features,
        params=_logged_params(f, chat, n, temperature),
        lora=lora,
    )


def _logged_params(f: _Fields, chat: bool, n: int, temperature: float) -> LoggedParams:
    """The request as vLLM's to_sampling_params and SamplingParams.__post_init__ turn it
    into the SamplingParams that its request log prints."""
    if chat:
        top = f.integer("top_logprobs", 0)
        logprobs, echo_logprobs = (top if f.boolean("logprobs") else None), top
    else:
        logprobs = echo_logprobs = f.integer("logprobs")
    prompt_logprobs = f.integer("prompt_logprobs")
    if prompt_logprobs is None and f.boolean("echo"):
        prompt_logprobs = echo_logprobs
    greedy = temperature < _SAMPLING_EPS
    if 0 < temperature < _MIN_TEMPERATURE:
        temperature = _MIN_TEMPERATURE
    seed = f.integer("seed")
    budget = f.integer("thinking_token_budget")
    return LoggedParams(
        n=n,
        presence_penalty=f.number("presence_penalty", 0.0) or 0.0,
        frequency_penalty=f.number("frequency_penalty", 0.0) or 0.0,
        repetition_penalty=_or(f.number("repetition_penalty"), 1.0),
        temperature=temperature,
        # Greedy sampling ignores these; vLLM resets them.
        top_p=1.0 if greedy else _or(f.number("top_p"), 1.0),
        top_k=0 if greedy else f.integer("top_k", 0) or 0,
        min_p=0.0 if greedy else f.number("min_p", 0.0) or 0.0,
        seed=None if seed == -1 else seed,
        stop=f.stop(),
        stop_token_ids=tuple(dict.fromkeys(f.int_list("stop_token_ids"))),
        bad_words=_bad_words(f.get("bad_words")),
        thinking_token_budget=None if budget == -1 else budget,
        include_stop_str_in_output=f.boolean("include_stop_str_in_output"),
        ignore_eos=f.boolean("ignore_eos"),
        min_tokens=f.integer("min_tokens", 0) or 0,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=f.boolean("skip_special_tokens", True),
        spaces_between_special_tokens=f.boolean("spaces_between_special_tokens", True),
        structured_outputs=_logged_structured(f),
        extra_args=_extra_args(f),
    )


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _bad_words(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(dict.fromkeys(str(word) for word in value))


def _logged_structured(f: _Fields) -> Mapping[str, Any] | None:
    """`structured_outputs`, overridden by `response_format` as vLLM's
    structured_outputs_from_response_format does."""
    given = f.get("structured_outputs")
    fields = (
        {k: v for k, v in given.items() if k in STRUCTURED_FIELDS}
        if isinstance(given, dict)
        else None
    )
    fmt = f.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return {**(fields or {}), "json_object": True}
    if kind == "json_schema" and isinstance(fmt, dict):
        spec = fmt.get("json_schema")
        return {**(fields or {}), "json": spec.get("schema") if isinstance(spec, dict) else None}
    return fields


def _extra_args(f: _Fields) -> Mapping[str, Any] | None:
    xargs = f.get("vllm_xargs")
    extra: dict[str, Any] = dict(xargs) if isinstance(xargs, dict) else {}
    for name in ("kv_transfer_params", "ec_transfer_params"):
        if f.get(name):
            extra[name] = f.get(name)
    return extra or None


def plan_features(features: Features) -> frozenset[str]:
    """The features of warmgate's plan (options.FEATURES) that a request uses.

    `sampling` is the top-p/top-k/min-p path (what the plan's sampling shapes send); a
    request at temperature > 0 without them samples too, but is not a `sampling` shape.
    """
    names = {
        "greedy": features.sampling == "greedy",
        "sampling": features.sampling == "top_p_top_k",
        "penalties": features.penalties,
        "seed": features.seeded,
        "n": features.n > 1,
        "logprobs": features.logprobs,
        "prompt_logprobs": features.prompt_logprobs,
        "json": features.grammar is not None,
    }
    return frozenset(name for name, used in names.items() if used)


def _reply_role(f: _Fields, messages: Sequence[tuple[str, str]]) -> str:
    """vLLM's `get_chat_request_role`: without a generation prompt the reply continues
    the last message, in its role."""
    if f.boolean("add_generation_prompt", True) or not messages:
        return "assistant"
    return messages[-1][0]


def _chat_echo(f: _Fields, messages: Sequence[tuple[str, str]]) -> str:
    """vLLM echoes the last message when its role is the reply's role."""
    if not f.boolean("echo") or not messages:
        return ""
    role, content = messages[-1]
    return content if role == _reply_role(f, messages) else ""


def _spec(
    f: _Fields, ctx: Context, prompt: Prompt, requested: int | None, common: _Common
) -> SamplingSpec:
    # vLLM clamps max_tokens to the context left (an omitted one takes all of it).
    left = ctx.max_model_len - len(prompt.ids)
    max_tokens = left if requested is None else min(requested, left)
    temperature = _check_sampling(f, max_tokens)
    return SamplingSpec(
        max_tokens=max_tokens,
        temperature=temperature,
        seed=f.integer("seed"),
        ignore_eos=f.boolean("ignore_eos"),
        min_tokens=f.integer("min_tokens", 0) or 0,
        stop=f.stop(),
        stop_token_ids=tuple(f.int_list("stop_token_ids")),
        include_stop_str_in_output=f.boolean("include_stop_str_in_output"),
        json_mode=common.json_mode,
        json_schema=common.json_schema,
    )


def _check_sampling(f: _Fields, max_tokens: int) -> float:
    """vLLM's SamplingParams checks, in its order and with its messages; returns the
    temperature. Some of vLLM's checks name no parameter (param null)."""
    for name in ("presence_penalty", "frequency_penalty"):
        value = f.number(name, 0.0)
        assert value is not None
        _require(-2 <= value <= 2, None, f"{name} must be in [-2, 2], got {value}.", value)
    repetition = f.number("repetition_penalty", 1.0)
    assert repetition is not None
    _require(
        repetition > 0,
        None,
        f"repetition_penalty must be greater than zero, got {repetition}.",
        repetition,
    )
    temperature = f.number("temperature", 1.0)
    assert temperature is not None
    _require(
        temperature >= 0,
        "temperature",
        f"temperature must be non-negative, got {temperature}.",
        temperature,
    )
    _require(
        temperature <= 2,
        "temperature",
        f"temperature must be in [0, 2], got {temperature}.",
        temperature,
    )
    top_p = f.number("top_p", 1.0)
    assert top_p is not None
    _require(0 < top_p <= 1, "top_p", f"top_p must be in (0, 1], got {top_p}.", top_p)
    top_k = f.integer("top_k", 0)
    assert top_k is not None
    _require(top_k >= -1, None, f"top_k must be 0 (disable), or at least 1, got {top_k}.", top_k)
    min_p = f.number("min_p", 0.0)
    assert min_p is not None
    _require(0 <= min_p <= 1, None, f"min_p must be in [0, 1], got {min_p}.", min_p)
    _require(
        max_tokens >= 1,
        "max_tokens",
        f"max_tokens must be at least 1, got {max_tokens}.",
        max_tokens,
    )
    min_tokens = f.integer("min_tokens", 0) or 0
    _require(
        min_tokens >= 0,
        None,
        f"min_tokens must be greater than or equal to 0, got {min_tokens}.",
        min_tokens,
    )
    _require(
        min_tokens <= max_tokens,
        None,
        f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}.",
        min_tokens,
    )
    _require("" not in f.stop(), None, "stop cannot contain an empty string.", None)
    return temperature


def _require(ok: bool, param: str | None, message: str, value: Any) -> None:
    if not ok:
        raise invalid(message, param, value)


def _sampling_path(f: _Fields, temperature: float) -> str:
    if temperature < _SAMPLING_EPS:
        return "greedy"
    top_p, top_k = f.number("top_p", 1.0), f.integer("top_k", 0)
    min_p = f.number("min_p", 0.0)
    if (top_p or 1.0) < 1.0 or (top_k or 0) > 0 or (min_p or 0.0) > 0:
        return "top_p_top_k"
    return "random"


def _has_penalties(f: _Fields) -> bool:
    return (
        (f.number("presence_penalty", 0.0) or 0.0) != 0
        or (f.number("frequency_penalty", 0.0) or 0.0) != 0
        or (f.number("repetition_penalty", 1.0) or 1.0) != 1
    )


def _grammar_key(common: _Common) -> str | None:
    if common.json_mode is None:
        return None
    if common.json_mode == "object":
        return "object"
    canonical = json.dumps(common.json_schema, sort_keys=True).encode()
    return f"schema-{zlib.crc32(canonical):08x}"


# -- tokenizer endpoints ---------------------------------------------------------------


def tokenize(body: dict[str, Any], ctx: Context) -> dict[str, Any]:
    f = _Fields(body)
    if "messages" in body:
        messages = _chat_messages(f.get("messages"))
        text = render_chat(messages, f.boolean("add_generation_prompt", True))
        add_special = f.boolean("add_special_tokens", False)
    else:
        text = f.string("prompt") or ""
        if "prompt" not in body:  # pydantic names both members of the request union
            raise request_errors(
                [
                    error_detail("body.prompt", "missing", "Field required", body),
                    error_detail("body.messages", "missing", "Field required", body),
                ]
            )
        add_special = f.boolean("add_special_tokens", True)
    return_strs = f.boolean("return_token_strs")
    _check_model(f, ctx)
    tokens = ctx.tokenizer.encode(text)
    if add_special:
        tokens = [BOS, *tokens]
    return {
        "count": len(tokens),
        "max_model_len": ctx.max_model_len,
        "tokens": tokens,
        "token_strs": [ctx.tokenizer.token_str(t) for t in tokens] if return_strs else None,
    }


def detokenize(body: dict[str, Any], ctx: Context) -> dict[str, Any]:
    f = _Fields(body)
    if "tokens" not in body:
        raise request_error("body.tokens", "missing", "Field required", body)
    tokens = f.int_list("tokens")
    _check_model(f, ctx)
    # Like vLLM, ids outside the vocabulary are dropped rather than refused.
    known = [t for t in tokens if 0 <= t < ctx.tokenizer.vocab_size]
    return {"prompt": ctx.tokenizer.decode(known)}
