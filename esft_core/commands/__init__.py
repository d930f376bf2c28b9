"""Subcommand groups of the `esft` CLI (see esft_core/cli.py): trace, training and demo commands; each module adds
its parsers and handlers. The output-file helpers they share live in esft_core/files.py."""
