"""The `mlc` command: convert, compile, chat, serve, bench.

Each subcommand lives in its own module and is imported only when used, so `mlc --help` is fast.
"""

from __future__ import annotations

import importlib
import sys

import click

from mlc.errors import MLCError

_COMMANDS = {
    "convert": ("mlc.cli.convert", "convert"),
    "compile": ("mlc.cli.compile", "compile_cmd"),
    "chat": ("mlc.cli.chat", "chat"),
    "serve": ("mlc.cli.serve", "serve"),
    "bench": ("mlc.cli.bench", "bench"),
    "doctor": ("mlc.cli.doctor", "doctor"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(_COMMANDS)

    def get_command(self, ctx, name):
        if name not in _COMMANDS:
            return None
        module, attr = _COMMANDS[name]
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if e.name == module:
                return None
            raise

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MLCError as e:
            click.echo(f"error: {e.message}", err=True)
            sys.exit(2)


@click.group(cls=LazyGroup)
@click.version_option(package_name="mlc")
def cli():
    """mlc: quantize, compile and serve LLMs with Apache TVM."""


if __name__ == "__main__":
    cli()
