"""The import rules of docs/architecture.md, read from the source (no module is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "warmgate"

CORE = {
    "options",
    "config",
    "errors",
    "lifecycle",
    "drain",
    "plan",
    "servers",
    "engineconfig",
    "latency",
    "group",
    "adapters",
    "profile",
}
# What a pure module must not touch: sockets, processes, threads, clocks of the event loop,
# and the libraries that wrap them.
IO_MODULES = {
    "asyncio",
    "socket",
    "subprocess",
    "threading",
    "signal",
    "fcntl",
    "ctypes",
    "selectors",
    "time",
    "httpx",
    "h11",
    "uvloop",
    "psutil",
    "pynvml",
    "prometheus_client",
    "structlog",
    "typer",
}
SUPERVISOR_ONLY = {
    *("supervisor", "gate", "member", "runargs", "cli", "worker", "warmup", "oneshot"),
}


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(warmgate modules, other top-level modules) that `path` imports, anywhere in it."""
    ours: set[str] = set()
    theirs: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "warmgate":
                names = [f"warmgate.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith("warmgate."):
                ours.add(name.removeprefix("warmgate."))
            elif name != "warmgate":
                theirs.add(name.split(".")[0])
    return ours, theirs


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


@pytest.mark.parametrize("name", sorted(CORE))
def test_the_core_imports_no_io_and_no_shell(name: str) -> None:
    ours, theirs = _imports(PACKAGE / f"{name}.py")
    assert not theirs & IO_MODULES, f"{name} imports {sorted(theirs & IO_MODULES)}"
    assert ours <= CORE, f"{name} imports {sorted(ours - CORE)}, outside the core"


@pytest.mark.parametrize(
    "path", sorted([*PACKAGE.glob("sim/*.py"), *PACKAGE.glob("bench/*.py")]), ids=_module
)
def test_tools_import_nothing_of_the_supervisor(path: Path) -> None:
    ours, _ = _imports(path)
    top = {name.split(".")[0] for name in ours}
    assert not top & SUPERVISOR_ONLY, f"{_module(path)} imports {sorted(top & SUPERVISOR_ONLY)}"


def test_every_module_has_a_layer() -> None:
    """A new top-level module must be placed in docs/architecture.md's table."""
    documented = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    missing = [name for name in modules if f"`{name}`" not in documented]
    assert not missing, f"not in docs/architecture.md: {missing}"
