"""`warmgate warmup`: one idempotent warm-up of a server that is already running."""

from __future__ import annotations

import asyncio
import sys

from warmgate import log
from warmgate.config import WarmupSettings
from warmgate.errors import Exit
from warmgate.plan import PlanError
from warmgate.upstream import Upstream
from warmgate.warmup import Progress, WarmupError, summary_table, warm


def warm_once(settings: WarmupSettings, log_level: str, log_format: str) -> int:
    """0 when every shape warmed, 1 when the upstream could not be warmed, 2 on bad input."""
    log.configure(log_level, log_format)
    return asyncio.run(_warm(settings))


async def _warm(settings: WarmupSettings) -> int:
    assert settings.upstream is not None
    logger = log.get()
    progress = Progress()
    upstream = Upstream(
        settings.upstream, api_key=settings.api_key, timeout=settings.request_timeout
    )
    try:
        async with asyncio.timeout(settings.warmup_timeout):
            ok, why = await upstream.health(settings.health_path)
            if not ok:
                logger.error(
                    "exit", reason="upstream_unhealthy", code=1, error=f"{settings.upstream}: {why}"
                )
                return 1
            await warm(upstream, settings, progress.handle)
    except (PlanError, WarmupError) as exc:
        bad_input = isinstance(exc, PlanError)
        code = Exit.USAGE if bad_input else 1
        logger.error(
            "exit", reason="usage" if bad_input else "warmup_failed", code=int(code), error=str(exc)
        )
        return int(code)
    except TimeoutError:
        logger.error(
            "exit",
            reason="warmup_failed",
            code=1,
            error=f"--warmup-timeout {settings.warmup_timeout:g} s",
        )
        return 1
    except Exception as exc:  # a broken upstream: one line, exit 1
        logger.error("exit", reason="warmup_failed", code=1, error=str(exc) or type(exc).__name__)
        return 1
    finally:
        await upstream.aclose()
    if sys.stderr.isatty():
        print(summary_table(progress.results), file=sys.stderr)
    logger.info("exit", reason="warm", code=0, shapes=len(progress.results))
    return 0
