"""`python -m warmgate` and the `warmgate` console script."""

from __future__ import annotations

import os
import sys


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["run"]:  # spawn the child before typer and pydantic load (issue 8)
        from warmgate import runargs

        code = runargs.run_without_typer(argv[1:], os.environ)
        if code is not None:
            sys.exit(code)
    from warmgate.cli import main as cli_main

    sys.exit(cli_main(argv))


if __name__ == "__main__":
    main()
