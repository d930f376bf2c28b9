"""Subcommand groups of the `esft` CLI (see esft_core/cli.py)."""
