"""The traffic profile: what clients sent after Ready, as shapes and never as content.

A profile counts *combinations* (endpoint, streaming, the sampling features a request
used, in the plan's own feature names, and the numeric sampling values of one such
request) and keeps three *marginals* (prompt-length octaves, max_tokens octaves and the
requests running at once). The engine's request log gives the combinations; its
/metrics histograms give the marginals, which no log line carries. The plan crosses the
two pairwise (`plan_specs`), most frequent first, so the next start warms what clients
send before the default plan's guesses.

Nothing here can hold a prompt or an output: the log parser keeps only the top-level
scalar fields of vLLM's `SamplingParams(...)` repr it knows (numbers, None, booleans)
and skips every quoted string (stop strings, bad words) unread. The file format
(`to_json`/`from_json`) is documented in the README ("The traffic profile").

Pure: the shell (warmgate.traffic, warmgate.profilestore) reads the log, /metrics and
the files, and passes the time in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from warmgate.plan import ADDON_FEATURES, ShapeSpec, covering_rows

__all__ = [
    "FORMAT",
    "VERSION",
    "Combo",
    "Profile",
    "ProfileError",
    "bucket_counts",
    "combo_from_params",
    "endpoint_of",
    "is_warmgate_request",
    "merge",
    "octave",
    "octaves_of",
    "parse_sampling_params",
    "plan_specs",
    "render",
    "to_plan_toml",
]

FORMAT = "warmgate-profile"
VERSION = 1
OWN_ID_MARK = "warmgate-"  # warmgate's X-Request-Id; vLLM logs it as chatcmpl-warmgate-...
_ID_PREFIXES = (("chatcmpl-", "chat"), ("cmpl-", "completions"))
MAX_COMBOS = 32  # combinations planned at most, the most frequent
MIN_SHARE = 0.01  # a length or concurrency level below this share of its marginal is noise
UNKNOWN_LENGTH = 32  # prompt tokens planned when /metrics gave no lengths (the plan's short one)
_SAMPLING_EPS = 1e-5  # vLLM samples greedily below this temperature
# SamplingParams fields that decide a request's path; their values are numbers or None.
KNOBS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "n",
    "seed",
    "logprobs",
    "prompt_logprobs",
)
_ADDONS = ADDON_FEATURES  # in the plan's order


class ProfileError(ValueError):
    """A profile file that is not one; the message names the file and the fix."""


# --- the request log: id and SamplingParams -------------------------------------------------


def endpoint_of(request_id: str) -> str | None:
    """ "chat" or "completions" from vLLM's id prefix; None for anything else."""
    for prefix, endpoint in _ID_PREFIXES:
        if request_id.startswith(prefix):
            return endpoint
    return None


def is_warmgate_request(request_id: str) -> bool:
    """warmgate's own warm-up requests (X-Request-Id warmgate-<hex>), which never count."""
    return request_id.partition("-")[2].startswith(OWN_ID_MARK)


def parse_sampling_params(text: str) -> dict[str, str] | None:
    """The top-level `name=value` fields of a `SamplingParams(...)` repr, values as written.

    Quoted strings are skipped character by character and never kept, and nested
    brackets stay inside their field's value, so a stop string holding ", seed=3" cannot
    pose as a field. None when `text` does not start with `SamplingParams(`.
    """
    head = "SamplingParams("
    if not text.startswith(head):
        return None
    fields: dict[str, str] = {}
    depth, quote, start = 0, "", len(head)
    i = start
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}" and depth:
            depth -= 1
        elif ch in ",)" and depth == 0:
            _keep_field(text[start:i], fields)
            if ch == ")":
                return fields
            start = i + 1
        i += 1
    return fields  # a line cut short: the fields read so far


def _keep_field(part: str, fields: dict[str, str]) -> None:
    name, eq, value = part.strip().partition("=")
    if not eq:
        return
    value = value.strip()
    if name == "structured_outputs":  # a nested repr: only whether there is one
        fields[name] = "None" if value == "None" else "set"
    elif name in KNOBS and value[:1] not in ("'", '"', "[", "{"):
        fields[name] = value


def _number(value: str | None) -> float | None:
    if value is None or value == "None":
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


@dataclass(frozen=True, order=True)
class Combo:
    """One combination of what a request asked for; the unit a profile counts.

    `feature` is the plan's: a sampling path (greedy, sampling or seed) and the add-ons
    the request used, joined with "+" ("sampling+logprobs+json"). `stream` is None when
    the log did not say (vLLM logs it with --enable-log-outputs, for chat only).
    `knobs` are one such request's numeric sampling values, so that the warm-up takes
    the same path through the sampler (top-k/top-p or plain random, say).
    """

    endpoint: str  # "chat" or "completions"
    stream: bool | None
    feature: str
    knobs: tuple[tuple[str, float], ...] = ()

    @property
    def name(self) -> str:
        mode = {True: "stream", False: "nostream", None: "stream?"}[self.stream]
        return f"{self.endpoint}/{mode}/{self.feature}"

    def body(self) -> dict[str, Any]:
        """The request-body fields of this combination on its endpoint (no prompt)."""
        knobs = dict(self.knobs)
        body: dict[str, Any] = {}
        for name in ("temperature", "top_p", "top_k", "min_p", *KNOBS[4:7]):
            if name in knobs:
                body[name] = _plain(knobs[name])
        if not self.feature.startswith("greedy"):  # vLLM's neutral values: the plain path
            for name, neutral in (("top_p", 1.0), ("top_k", 0), ("min_p", 0.0)):
                body.setdefault(name, neutral)
        if knobs.get("n", 1) > 1:
            body["n"] = int(knobs["n"])
        if "seed" in knobs:
            body["seed"] = 1234  # a seeded request's path; the client's own seed is not kept
        if "logprobs" in knobs:
            k = int(knobs["logprobs"])
            body.update(
                {"logprobs": True, "top_logprobs": k}
                if self.endpoint == "chat"
                else {"logprobs": k}
            )
        if "prompt_logprobs" in knobs:
            body["prompt_logprobs"] = int(knobs["prompt_logprobs"])
        if "json" in self.feature.split("+"):
            body["response_format"] = {"type": "json_object"}
        return body


def _plain(value: float) -> float | int:
    return int(value) if value == int(value) and abs(value) < 2**31 else value


def combo_from_params(endpoint: str, params: Mapping[str, str], stream: bool | None) -> Combo:
    """The combination of one logged request: its path, add-ons and the knobs behind them."""
    values = {name: _number(params.get(name)) for name in KNOBS}
    temperature = values["temperature"]
    greedy = temperature is not None and temperature < _SAMPLING_EPS
    seeded = values["seed"] is not None
    path = "greedy" if greedy else ("seed" if seeded else "sampling")
    penalties = (
        (values["presence_penalty"] or 0.0) != 0.0
        or (values["frequency_penalty"] or 0.0) != 0.0
        or (values["repetition_penalty"] or 1.0) != 1.0
    )
    on = {
        "penalties": penalties,
        "n": (values["n"] or 1) > 1,
        "logprobs": values["logprobs"] is not None,
        "prompt_logprobs": values["prompt_logprobs"] is not None,
        "json": params.get("structured_outputs", "None") != "None",
    }
    feature = "+".join([path, *(name for name in _ADDONS if on[name])])
    knobs: dict[str, float] = {}
    if temperature is not None:
        knobs["temperature"] = temperature
    if not greedy:  # the sampler's path: top-k/top-p/min-p, or none of them
        for name in ("top_p", "top_k", "min_p"):
            if (value := values[name]) is not None:
                knobs[name] = value
    if penalties:
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
            if (value := values[name]) is not None:
                knobs[name] = value
    if on["n"]:
        knobs["n"] = values["n"] or 1.0
    if seeded:
        knobs["seed"] = 1.0  # that there was one; never its value
    for name in ("logprobs", "prompt_logprobs"):
        if (value := values[name]) is not None:
            knobs[name] = value
    return Combo(endpoint, stream, feature, tuple(sorted(knobs.items())))


# --- /metrics: histograms to octaves ------------------------------------------------------


def octave(n: float) -> int:
    """The power of two at the top of n's octave: 1, 2, 4, ... (100 -> 128)."""
    return 1 if n <= 1 else 1 << (math.ceil(n) - 1).bit_length()


def bucket_counts(
    now: Mapping[float, float], then: Mapping[float, float] | None = None
) -> dict[tuple[float, float], float]:
    """Per-range counts (low, high] from cumulative `le` buckets, less those of `then`
    (the snapshot at Ready, so warm-up traffic is not counted). A counter that went back
    (the engine restarted) counts from zero."""
    then = then or {}
    if any(now.get(le, 0.0) < count for le, count in then.items()):
        then = {}
    ranges: dict[tuple[float, float], float] = {}
    low, below = 0.0, 0.0
    for le in sorted(now):
        cumulative = now[le] - then.get(le, 0.0)
        if cumulative - below > 0:
            ranges[(low, le)] = cumulative - below
        low, below = le, max(below, cumulative)
    return ranges


def octaves_of(ranges: Mapping[tuple[float, float], float]) -> dict[int, float]:
    """Spread each range's count over the octaves it overlaps, by overlap in log space:
    vLLM's buckets run 1-2-5 (100, 200, 500), not in octaves. Token counts are whole
    numbers, so (100, 200] starts at 101. The open top range (le=+Inf) counts in the
    octave above its lower bound."""
    octaves: dict[int, float] = {}
    for (low, high), count in ranges.items():
        if math.isinf(high):
            high = max(low, 1.0) * 2
        if high <= 1:
            octaves[1] = octaves.get(1, 0.0) + count
            continue
        low = max(low, 1.0)
        span = math.log2(high / low)
        o = octave(math.floor(low) + 1)
        while o <= octave(high):
            overlap = math.log2(min(high, o) / max(low, o / 2))
            if overlap > 0:
                octaves[o] = octaves.get(o, 0.0) + count * overlap / span
            o *= 2
    return {o: round(c, 3) for o, c in sorted(octaves.items()) if c > 0}


# --- the profile ------------------------------------------------------------------------


@dataclass
class Profile:
    """Counts learned by one pod (or merged from several) for one profile key."""

    key: str
    combos: dict[Combo, int] = field(default_factory=dict)
    prompt_tokens: dict[int, float] = field(default_factory=dict)  # octave -> requests
    max_tokens: dict[int, float] = field(default_factory=dict)  # octave -> requests
    concurrency: dict[int, int] = field(default_factory=dict)  # power of two -> samples
    first_seen: float | None = None  # wall time of the first request counted
    updated: float | None = None  # wall time of the last write
    pods: tuple[str, ...] = ()

    @property
    def requests(self) -> int:
        return sum(self.combos.values())

    def count(self, combo: Combo, now: float, times: int = 1) -> None:
        self.combos[combo] = self.combos.get(combo, 0) + times
        self.first_seen = self.first_seen if self.first_seen is not None else now

    def summary(self, now: float) -> dict[str, Any]:
        """What /status and `profile show` say about it first."""
        return {
            "key": self.key,
            "requests": self.requests,
            "combinations": len(self.combos),
            "pods": list(self.pods),
            "age_s": round(now - self.first_seen, 1) if self.first_seen is not None else None,
            "updated_s_ago": round(now - self.updated, 1) if self.updated is not None else None,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "key": self.key,
            "pods": list(self.pods),
            "first_seen": self.first_seen,
            "updated": self.updated,
            "requests": self.requests,
            "combos": [
                {
                    "endpoint": c.endpoint,
                    "stream": c.stream,
                    "feature": c.feature,
                    "knobs": dict(c.knobs),
                    "count": n,
                }
                for c, n in sorted(self.combos.items(), key=lambda item: (-item[1], item[0]))
            ],
            "prompt_tokens": {str(k): v for k, v in sorted(self.prompt_tokens.items())},
            "max_tokens": {str(k): v for k, v in sorted(self.max_tokens.items())},
            "concurrency": {str(k): v for k, v in sorted(self.concurrency.items())},
        }

    @classmethod
    def from_json(cls, data: object, source: str) -> Profile:
        """The profile a parsed file holds; ProfileError naming `source` when it is not one."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ProfileError(f'{source}: not a warmgate profile (no "format": "{FORMAT}")')
        if data.get("version") != VERSION:
            raise ProfileError(
                f"{source}: profile version {data.get('version')!r}; this warmgate reads "
                f"{VERSION} (delete the file, or use the warmgate that wrote it)"
            )
        try:
            combos: dict[Combo, int] = {}
            for record in data["combos"]:
                combo = _combo(record)
                combos[combo] = combos.get(combo, 0) + _count(record["count"])
            return cls(
                key=str(data["key"]),
                combos=combos,
                prompt_tokens=_marginal(data.get("prompt_tokens", {})),
                max_tokens=_marginal(data.get("max_tokens", {})),
                concurrency={k: int(v) for k, v in _marginal(data.get("concurrency", {})).items()},
                first_seen=_time(data.get("first_seen")),
                updated=_time(data.get("updated")),
                pods=tuple(str(p) for p in data.get("pods", ())),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProfileError(
                f"{source}: malformed profile ({type(exc).__name__}: {exc})"
            ) from None


def _combo(record: Mapping[str, Any]) -> Combo:
    endpoint = record["endpoint"]
    if endpoint not in ("chat", "completions"):
        raise ValueError(f"endpoint {endpoint!r}")
    stream = record.get("stream")
    if stream not in (True, False, None):
        raise ValueError(f"stream {stream!r}")
    feature = str(record["feature"])
    knobs = record.get("knobs", {})
    if not isinstance(knobs, dict) or not set(knobs) <= set(KNOBS):
        raise ValueError(f"knobs {knobs!r}")
    numbers = {str(k): float(v) for k, v in knobs.items() if not isinstance(v, bool)}
    return Combo(endpoint, stream, feature, tuple(sorted(numbers.items())))


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"count {value!r}")
    return value


def _marginal(data: object) -> dict[int, float]:
    if not isinstance(data, dict):
        raise TypeError("a marginal must be an object of octave -> count")
    return {int(k): float(v) for k, v in data.items() if float(v) > 0}


def _time(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def merge(profiles: Iterable[Profile], key: str | None = None) -> Profile:
    """Sum of the counts of several pods' profiles (a start reads every pod's file)."""
    profiles = list(profiles)
    merged = Profile(key or (profiles[0].key if profiles else ""))
    for p in profiles:
        for combo, n in p.combos.items():
            merged.combos[combo] = merged.combos.get(combo, 0) + n
        for mine, theirs in (
            (merged.prompt_tokens, p.prompt_tokens),
            (merged.max_tokens, p.max_tokens),
        ):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0.0) + v
        for k, c in p.concurrency.items():
            merged.concurrency[k] = merged.concurrency.get(k, 0) + c
        merged.first_seen = _earliest(merged.first_seen, p.first_seen)
        merged.updated = max(filter(None, (merged.updated, p.updated)), default=None)
        merged.pods += tuple(x for x in p.pods if x not in merged.pods)
    return merged


def _earliest(a: float | None, b: float | None) -> float | None:
    return min(filter(None, (a, b)), default=None)


# --- the plan it gives --------------------------------------------------------------------


def _levels(marginal: Mapping[int, float]) -> list[tuple[int, float]]:
    """(level, share), most frequent first, without levels below MIN_SHARE."""
    total = sum(marginal.values())
    if total <= 0:
        return []
    kept = [(k, v / total) for k, v in marginal.items() if v / total >= MIN_SHARE]
    return sorted(kept, key=lambda kv: (-kv[1], kv[0]))


def prompt_target(top: int) -> int:
    """Prompt tokens to plan for an octave: three quarters up it, so that a text prompt's
    miss or a chat template's tokens keep it inside (an octave is (top/2, top])."""
    return top if top <= 4 else (3 * top) // 4


def plan_specs(
    profile: Profile, *, max_prompt_tokens: int, max_inflight_tokens: int | None = None
) -> tuple[ShapeSpec, ...]:
    """The shapes a start with this profile warms first, weighted by observed frequency.

    The combinations (the most frequent MAX_COMBOS) are crossed pairwise with the
    prompt-length octaves and the concurrency levels seen (plan.covering_rows); a row's
    weight is its combination's count times the two levels' shares. A combination whose
    streaming is unknown is planned both ways (prompt_logprobs: unstreamed only, as vLLM
    refuses it streamed). Without lengths, the plan's short prompt stands in.
    """
    combos = sorted(profile.combos.items(), key=lambda item: (-item[1], item[0]))[:MAX_COMBOS]
    if not combos:
        return ()
    lengths = _levels(profile.prompt_tokens) or [(UNKNOWN_LENGTH, 1.0)]
    fitting: dict[int, float] = {}  # a clamp to the context can merge two levels
    for top, share in lengths:
        tokens = max(1, min(prompt_target(top), max_prompt_tokens))
        fitting[tokens] = fitting.get(tokens, 0.0) + share
    lengths = sorted(fitting.items(), key=lambda kv: (-kv[1], kv[0]))
    levels = _levels({k: float(v) for k, v in profile.concurrency.items()}) or [(1, 1.0)]
    if all(level > 1 for level, _ in levels):
        # A single request fits any length: without it, a length whose batches the cap
        # forbids would leave the covering no level to pick.
        levels.append((1, 0.0))
    cap = max_inflight_tokens

    def ok(i: int, a: int, j: int, b: int) -> bool:
        if cap is None or (i, j) != (1, 2):
            return True
        return lengths[a][0] * levels[b][0] <= cap or levels[b][0] == 1

    specs: list[ShapeSpec] = []
    for row in covering_rows([len(combos), len(lengths), len(levels)], ok):
        (combo, count), (tokens, share), (conc, conc_share) = (
            combos[row[0]],
            lengths[row[1]],
            levels[row[2]],
        )
        weight = count * share * conc_share
        for stream in _streams(combo):
            specs.append(
                ShapeSpec(
                    where=f"profile {combo.name} x len{tokens} x c{conc}",
                    endpoint=combo.endpoint,
                    prompt_tokens=tokens,
                    stream=stream,
                    feature=combo.feature,
                    concurrency=conc,
                    body=combo.body(),
                    weight=weight,
                )
            )
    return tuple(sorted(specs, key=lambda s: -s.weight))


def _streams(combo: Combo) -> tuple[bool, ...]:
    if combo.stream is not None:
        return (combo.stream,)
    return (False,) if "prompt_logprobs" in combo.feature.split("+") else (True, False)


def to_plan_toml(profile: Profile, *, max_prompt_tokens: int = 1 << 30) -> str:
    """A --plan file that replays the profile's shapes: review it, commit it, or seed a
    new cluster with `warmgate run --plan`. mode = "extend": the default plan follows."""
    lines = [
        f"# warmgate profile {profile.key}: {profile.requests} requests, "
        f"{len(profile.combos)} combinations",
        "# Shapes most frequent first; weight = observed requests x length and concurrency share.",
        'mode = "extend"',
    ]
    for spec in plan_specs(profile, max_prompt_tokens=max_prompt_tokens):
        lines += [
            "",
            f"# {spec.where}, weight {spec.weight:.3g}",
            "[[shape]]",
            f'endpoint = "{spec.endpoint}"',
            f"prompt_tokens = {spec.prompt_tokens}",
            f"stream = {str(spec.stream).lower()}",
            f'feature = "{spec.feature}"',
            f"concurrency = {spec.concurrency}",
            f"body = {_toml_table(spec.body)}",
        ]
    return "\n".join(lines) + "\n"


def _toml_table(body: Mapping[str, Any]) -> str:
    return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in body.items()) + " }"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return _toml_table(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(profile: Profile, now: float) -> str:
    """`warmgate profile show`: the profile as a person reads it, most frequent first."""
    summary = profile.summary(now)
    age = "unknown" if summary["age_s"] is None else f"{summary['age_s']:.0f} s"
    lines = [
        f"profile {profile.key}: {profile.requests} requests, {len(profile.combos)} "
        f"combinations, pods {', '.join(profile.pods) or '-'}, learning for {age}",
        "",
        f"{'requests':>8} {'share':>6}  combination (endpoint/stream/features)  knobs",
    ]
    total = profile.requests or 1
    for combo, count in sorted(profile.combos.items(), key=lambda item: (-item[1], item[0])):
        knobs = " ".join(f"{k}={_plain(v)}" for k, v in combo.knobs) or "-"
        lines.append(f"{count:>8} {count / total:>6.0%}  {combo.name:<38} {knobs}")
    for title, marginal in (
        ("prompt tokens (octave top: share)", profile.prompt_tokens),
        ("max_tokens (octave top: share)", profile.max_tokens),
        ("requests running (level: share of samples)", profile.concurrency),
    ):
        levels = _levels({k: float(v) for k, v in marginal.items()})
        shown = "  ".join(f"{k}: {share:.0%}" for k, share in sorted(levels)) or "not measured"
        lines += ["", f"{title}:", f"  {shown}"]
    return "\n".join(lines) + "\n"
