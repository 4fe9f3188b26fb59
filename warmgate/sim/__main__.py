"""`python -m warmgate.sim ...`: the simulator without the main CLI."""

from __future__ import annotations

import typer

from warmgate.sim.cli import sim_command

if __name__ == "__main__":
    typer.run(sim_command)
