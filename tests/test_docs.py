"""Docs that cannot drift: every `esft` subcommand and flag is in README's CLI table, every ESFT_* environment
variable is read through esft_core/settings.py and documented in README."""

from __future__ import annotations

import re
from pathlib import Path

from esft_core import settings
from esft_core.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _subcommands() -> dict:
    action = next(a for a in build_parser()._actions if a.dest == "command")  # argparse has no public accessor
    return action.choices


def _cli_rows() -> dict[str, str]:
    table = README[README.index("## CLI reference"):]
    table = table[: table.index("\n## ", 5)]
    rows = {}
    for line in table.splitlines():
        m = re.match(r"\| `esft ([a-z-]+)[^`]*` \|", line)
        if m:
            rows[m.group(1)] = line
    return rows


def test_every_subcommand_and_flag_is_in_the_readme_cli_table():
    rows = _cli_rows()
    missing = []
    for name, parser in _subcommands().items():
        if name not in rows:
            missing.append(f"esft {name}")
            continue
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help" and not re.search(rf"`{re.escape(flag)}[ `]", rows[name]):
                    missing.append(f"esft {name} {flag}")
    assert not missing, f"README's CLI table lacks: {', '.join(missing)}"
    extra = set(rows) - set(_subcommands())
    assert not extra, f"README documents commands that do not exist: {extra}"


def test_every_environment_variable_is_read_in_settings_and_documented():
    used = set()
    for path in [*ROOT.glob("esft_core/**/*.py"), *ROOT.glob("explorer/**/*.py"), ROOT / "app.py"]:
        used |= set(re.findall(r"ESFT_[A-Z0-9_]+", path.read_text(encoding="utf-8")))
    assert used <= set(settings.VARS), f"ESFT_* names used but not declared in settings.py: {used - set(settings.VARS)}"
    raw_reads = []
    for path in [*ROOT.glob("esft_core/**/*.py"), *ROOT.glob("explorer/**/*.py")]:
        if path.name == "settings.py":
            continue
        text = path.read_text(encoding="utf-8")
        if re.search(r"environ(?:\.get)?\(?\[?[\"']ESFT_", text):
            raw_reads.append(str(path.relative_to(ROOT)))
    assert not raw_reads, f"read ESFT_* through esft_core.settings, not os.environ: {raw_reads}"
    env = README[README.index("## Environment variables"):]
    undocumented = [n for n in settings.VARS if f"`{n}`" not in env]
    assert not undocumented, f"README's Environment variables section lacks: {undocumented}"


def test_one_error_style_for_every_command_group():
    """Usage errors of every group (demo, trace, training, and the top level) are one line, exit 2."""
    import subprocess
    import sys

    cases = [(["demo-data", "--n-train", "x"], "esft demo-data: error: argument --n-train"),
             (["select", "--db", "x.duckdb"], "esft select: error: the following arguments are required"),
             (["train", "--data", "d", "--out", "o", "--method", "bogus"], "esft train: error: argument --method"),
             (["eval"], "esft eval: error: the following arguments are required: --data"),
             (["no-such-command"], "esft: error: argument COMMAND: invalid choice")]
    procs = [subprocess.Popen([sys.executable, "-m", "esft_core.cli", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args, _ in cases]
    for (args, want), p in zip(cases, procs, strict=True):
        out, err = p.communicate(timeout=60)
        assert p.returncode == 2 and out == "", args
        assert err.strip().startswith(want) and len(err.strip().splitlines()) == 1, (args, err)
