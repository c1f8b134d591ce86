"""Subcommands of the consa CLI, one module each (see consa.cli)."""
