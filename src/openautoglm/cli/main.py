"""The `autoglm` command. Each command is a thin wrapper: parse flags, call the library."""

from __future__ import annotations

import typer

from openautoglm.cli import audit, bench, config, doctor, estimate, generate, keys, rollout, serve, task, templates

app = typer.Typer(
    name="autoglm",
    help="Open-AutoGLM: serve GLM-family language models in production.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
generate.register(app)
bench.register(app)
serve.register(app)
keys.register(app)
audit.register(app)
rollout.register(app)
config.register(app)
estimate.register(app)
doctor.register(app)
task.register(app)
templates.register(app)

if __name__ == "__main__":
    app()
