"""`warmgate sim`: options only; `server.run_sim` does the work.

Every option can also be set as WARMGATE_SIM_<OPTION> (e.g. WARMGATE_SIM_MAX_MODEL_LEN).
The main CLI registers this with `app.command("sim")(sim_command)`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from warmgate.sim.settings import OnSigterm


def _opt(name: str, help_text: str) -> Any:
    flag = "--" + name.lower().replace("_", "-")
    return typer.Option(flag, envvar=f"WARMGATE_SIM_{name}", help=help_text)


def sim_command(
    host: Annotated[str, _opt("HOST", "Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, _opt("PORT", "Port to listen on; 0 picks a free one.")] = 8000,
    model: Annotated[str, _opt("MODEL", "Served model name.")] = "warmgate/sim",
    max_model_len: Annotated[int, _opt("MAX_MODEL_LEN", "Context length in tokens.")] = 4096,
    load_seconds: Annotated[
        float, _opt("LOAD_SECONDS", "Seconds of model loading before the port opens.")
    ] = 2.0,
    compile_seconds: Annotated[
        float,
        _opt(
            "COMPILE_SECONDS",
            "Seconds of engine compilation after loading, saved to and loaded from "
            "$VLLM_CACHE_ROOT/torch_compile_cache as vLLM does (0: none).",
        ),
    ] = 0.0,
    listen_early: Annotated[
        bool, _opt("LISTEN_EARLY", "Listen during loading, answering 503 to everything.")
    ] = False,
    time_scale: Annotated[
        float, _opt("TIME_SCALE", "Real seconds slept per simulated second (0: no sleeping).")
    ] = 1.0,
    costs: Annotated[
        Path | None, _opt("COSTS", "TOML or JSON file overriding the cost profile.")
    ] = None,
    profile: Annotated[str, _opt("PROFILE", "Built-in cost profile: cpu or h100.")] = "cpu",
    max_num_seqs: Annotated[
        int | None,
        _opt(
            "MAX_NUM_SEQS",
            "Sequences per batch; more requests wait. Default: vLLM's for the profile "
            "(cpu 128, h100 1024).",
        ),
    ] = None,
    max_num_batched_tokens: Annotated[
        int | None,
        _opt(
            "MAX_NUM_BATCHED_TOKENS",
            "Token budget of one engine step: a decoding sequence takes 1, a prefill its "
            "chunk. Default: vLLM's for the profile (cpu 2048, h100 8192).",
        ),
    ] = None,
    enable_chunked_prefill: Annotated[
        bool,
        typer.Option(
            "--enable-chunked-prefill/--no-enable-chunked-prefill",
            envvar="WARMGATE_SIM_ENABLE_CHUNKED_PREFILL",
            help="Split prompts longer than the step's budget left over several steps; "
            "without it a prompt waits until it fits whole.",
        ),
    ] = True,
    on_sigterm: Annotated[
        OnSigterm,
        _opt(
            "ON_SIGTERM",
            "abort: end in-flight requests (vLLM's default); hang: never finish them; "
            "drain: finish them, refuse new ones.",
        ),
    ] = OnSigterm.abort,
    crash_after: Annotated[
        float | None,
        _opt("CRASH_AFTER", "Exit with --crash-code this many seconds after start."),
    ] = None,
    crash_code: Annotated[
        int, _opt("CRASH_CODE", "Exit code of a simulated crash (0 mirrors vLLM's API server).")
    ] = 1,
    crash_on_feature: Annotated[
        str | None,
        _opt(
            "CRASH_ON_FEATURE",
            "Exit with --crash-code when a generation request using this feature arrives "
            "(greedy, sampling, penalties, seed, n, logprobs, prompt_logprobs, json: the "
            "names of warmgate's plan).",
        ),
    ] = None,
    crash_above_tokens: Annotated[
        int | None,
        _opt(
            "CRASH_ABOVE_TOKENS",
            "With --crash-on-feature: crash only when more prompt tokens than this are "
            "scheduled (running and waiting, the new request's included), as vLLM CPU's "
            "seeded chunked prefill does.",
        ),
    ] = None,
    crash_during_load: Annotated[
        bool, _opt("CRASH_DURING_LOAD", "Crash half-way through loading.")
    ] = False,
    health_flap: Annotated[
        str | None,
        _opt(
            "HEALTH_FLAP",
            'After loading, /health is 200 for OK_S then 503 for BAD_S, repeating: "OK_S,BAD_S".',
        ),
    ] = None,
    hang_health_after: Annotated[
        float | None,
        _opt("HANG_HEALTH_AFTER", "Seconds after loading when /health stops answering."),
    ] = None,
    fail_first: Annotated[
        int, _opt("FAIL_FIRST", "Answer HTTP 500 to the first K generation requests.")
    ] = 0,
    malformed: Annotated[
        bool, _opt("MALFORMED", "Generation endpoints answer 200 with non-JSON garbage.")
    ] = False,
    slow: Annotated[float, _opt("SLOW", "Extra seconds before each generation response.")] = 0.0,
    log_level: Annotated[str, _opt("LOG_LEVEL", "debug, info, warning or error.")] = "info",
    enable_log_requests: Annotated[
        bool,
        _opt("ENABLE_LOG_REQUESTS", "Log each request's id as it arrives and ends, as vLLM does."),
    ] = False,
    enable_log_outputs: Annotated[
        bool,
        _opt("ENABLE_LOG_OUTPUTS", "Log chat outputs, as vLLM does (needs --enable-log-requests)."),
    ] = False,
    enable_sleep_mode: Annotated[
        bool,
        _opt(
            "ENABLE_SLEEP_MODE",
            "Sleeping frees the weights and KV cache: sleep and wake-up take time, and each "
            "batch size's first step after wake-up reallocates. The endpoints (/sleep, "
            "/wake_up, /is_sleeping) exist only with VLLM_SERVER_DEV_MODE=1, as in vLLM; "
            "without this flag they only pause. Not with --profile cpu (vLLM's CPU build "
            "refuses it).",
        ),
    ] = False,
    enable_lora: Annotated[
        bool, _opt("ENABLE_LORA", "Serve LoRA adapters (model=<adapter name>).")
    ] = False,
    max_loras: Annotated[
        int, _opt("MAX_LORAS", "Distinct LoRA adapters in one batch; others wait.")
    ] = 1,
    lora_modules: Annotated[
        list[str] | None,
        _opt(
            "LORA_MODULES",
            "name=path of an adapter to load at start (a directory); repeat the flag for "
            "more. With VLLM_ALLOW_RUNTIME_LORA_UPDATING=1, POST /v1/load_lora_adapter and "
            "/v1/unload_lora_adapter change them at run time.",
        ),
    ] = None,
    group_size: Annotated[
        int,
        _opt(
            "GROUP_SIZE",
            "Multi-node leader: wait for GROUP_SIZE-1 workers on --group-port before loading; "
            "a lost worker kills the engine (as a Ray group's).",
        ),
    ] = 1,
    group_port: Annotated[
        int, _opt("GROUP_PORT", "The port a leader's workers join (on --host; 0: any).")
    ] = 6379,
    group_leader: Annotated[
        str | None,
        _opt(
            "GROUP_LEADER",
            "Multi-node worker (ray start --block): join the leader at HOST:PORT, heartbeat, "
            "serve no HTTP.",
        ),
    ] = None,
) -> None:
    """Run a deterministic vLLM stand-in with lazy-compilation costs and injectable faults."""
    # Imported here, not at the top: `warmgate run` loads this module to build its
    # CLI and must exec its child before anything heavy is imported.
    import os

    from warmgate import log as wglog
    from warmgate.sim.lora import parse_module
    from warmgate.sim.settings import (
        SettingsError,
        SimSettings,
        load_costs,
        parse_flap,
        scheduler_limits,
        vllm_env,
    )

    wglog.configure(log_level)
    try:
        dev_mode, runtime_lora = vllm_env(os.environ)
        modules = tuple(parse_module(text) for text in lora_modules or ())
        seqs, budget = scheduler_limits(
            profile, max_model_len, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill
        )
        settings = SimSettings(
            host=host,
            port=port,
            model=model,
            max_model_len=max_model_len,
            load_seconds=load_seconds,
            compile_seconds=compile_seconds,
            listen_early=listen_early,
            time_scale=time_scale,
            costs=load_costs(costs, profile),
            profile=profile,
            max_num_seqs=seqs,
            max_num_batched_tokens=budget,
            enable_chunked_prefill=enable_chunked_prefill,
            on_sigterm=on_sigterm.value,
            crash_after=crash_after,
            crash_code=crash_code,
            crash_during_load=crash_during_load,
            crash_on_feature=crash_on_feature,
            crash_above_tokens=crash_above_tokens,
            health_flap=parse_flap(health_flap),
            hang_health_after=hang_health_after,
            fail_first=fail_first,
            malformed=malformed,
            slow=slow,
            enable_log_requests=enable_log_requests,
            enable_log_outputs=enable_log_outputs,
            enable_sleep_mode=enable_sleep_mode,
            dev_mode=dev_mode,
            enable_lora=enable_lora,
            max_loras=max_loras,
            lora_modules=modules,
            runtime_lora_updating=runtime_lora,
            group_size=group_size,
            group_port=group_port,
            group_leader=group_leader,
        )
    except SettingsError as exc:
        print(f"warmgate sim: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    raise typer.Exit(_run(settings))


def _run(settings: Any) -> int:
    import uvloop

    if settings.group_leader is not None:
        from warmgate.sim.group import run_worker

        return uvloop.run(run_worker(settings.group_leader))
    from warmgate.sim.server import run_sim

    return uvloop.run(run_sim(settings))
