"""Entry point of the `ember` command.

Each command group lives in its own module and registers itself here, so this file stays a
table of contents. Heavy imports (torch, transformers) happen inside commands, never at import
time: `ember --help` and the controller commands must work without the `worker` extra.
"""

from __future__ import annotations

import typer

from ember.cli import checkpoint_commands
from ember.cli import controller_commands
from ember.cli import deploy_commands
from ember.cli import keys_commands
from ember.cli import migration_commands
from ember.cli import sim_commands
from ember.cli import worker_commands

app = typer.Typer(
    name="ember",
    help="Ember: serverless LLM inference with fast cold starts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

checkpoint_commands.register(app)
controller_commands.register(app)
deploy_commands.register(app)
keys_commands.register(app)
migration_commands.register(app)
sim_commands.register(app)
worker_commands.register(app)


if __name__ == "__main__":
    app()
