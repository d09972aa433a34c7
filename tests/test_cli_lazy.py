"""`rubric-fast <command>` imports that command's module only (the CLI's subcommands load lazily)."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
from rubric_fast import cli
try:
    cli.main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.startswith(("rubric_fast.", "transformers", "triton")))))
"""


def _loaded(*args):
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_score_help_does_not_import_the_trainer_or_the_kernels():
    mods = _loaded("score", "--help")
    assert "rubric_fast.scoring.command" in mods
    assert not any(m.startswith("rubric_fast.trainer") for m in mods), sorted(mods)
    assert "rubric_fast.compile_check" not in mods and "triton" not in mods


def test_top_level_help_imports_no_command():
    mods = _loaded("--help")
    assert not any(m.endswith("command") or m.startswith("rubric_fast.trainer") for m in mods), sorted(mods)


def test_every_command_still_parses():
    from rubric_fast import cli

    parser = cli.build_parser()  # every module
    for name in cli.COMMANDS:
        assert name in parser._subparsers._group_actions[0].choices
