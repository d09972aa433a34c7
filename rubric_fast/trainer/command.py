"""``rubric-fast train [CONFIG] [key=value ...]``.

Without CONFIG the embedded default (examples/default.yaml) runs: a tiny model built from a config, a
small rubric dataset judged by the rule judge, on the CPU in about half a minute, and the reward rises.
Exit codes: 0 done; 1 stopped (judge failures, non-finite losses, a failed collective); 2 bad config, data,
run directory or checkpoint; 130 / 143 interrupted by SIGINT / SIGTERM (after a checkpoint).
"""

from __future__ import annotations

import argparse
import math
import re
import sys

from .config import EXAMPLES_DIR, ConfigError, load_config
from .dist import dist_info

DEFAULT_CONFIG = EXAMPLES_DIR / "default.yaml"
# what gloo / NCCL say when a peer is gone or a collective timed out (gloo raises a plain RuntimeError)
_COLLECTIVE_FAILURE = re.compile(r"gloo|nccl|connection closed|connection reset|timed out|timeout", re.IGNORECASE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None,
                        help="YAML config (default: the embedded tiny CPU run, examples/default.yaml); "
                             "may be omitted when only key=value overrides follow")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides parsed as YAML scalars, e.g. optimization.lr=1e-5 max_steps=50")
    parser.add_argument("--help-config", nargs="?", const="", default=None, metavar="SECTION",
                        help="print every config key (type, default, help, accepted values) and exit; "
                             "SECTION (e.g. algorithm.policy_loss or judge) prints one section")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "help_config", None) is not None:
        from .config import help_config

        text = help_config(args.help_config or None)
        if not text.strip():
            print(f"rubric-fast train: --help-config: no config key or section {args.help_config!r}; "
                  "see rubric-fast train --help-config", file=sys.stderr)
            return 2
        sys.stdout.write(text)
        return 0
    config, overrides = args.config, list(args.overrides or [])
    if config is not None and "=" in config:  # `rubric-fast train max_steps=20`: no config, only overrides
        config, overrides = None, [config] + overrides
    try:
        cfg = load_config(config if config is not None else DEFAULT_CONFIG, overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"rubric-fast train: {exc}", file=sys.stderr)
        return 2
    from torch.distributed import DistError

    from .checkpoint import CheckpointError
    from .loop import TrainingStopped, train

    try:
        from rubric_fast.scoring import ScoringError
    except ImportError:  # pragma: no cover
        ScoringError = TrainingStopped
    from rubric_fast.rubric import RubricError

    from .interrupt import SIGNALS, Interrupted

    installed = SIGNALS.install()
    try:
        result = train(cfg)
    except Interrupted as exc:  # SIGINT / SIGTERM: one line, 130 / 143
        if dist_info().rank == 0:
            where = (f"after step {exc.step}; checkpoint {exc.checkpoint}; continue with checkpoint.resume=auto"
                     if exc.checkpoint else "before the first step; nothing to save")
            print(f"rubric-fast train: interrupted by {exc} {where}", file=sys.stderr)
        return exc.exit_code
    except RubricError as exc:  # the dataset: the message names file, line and key
        print(f"rubric-fast train: data.path: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:  # found while building the run (data, run dir, judge section)
        print(f"rubric-fast train: {exc}", file=sys.stderr)
        return 2
    except (TrainingStopped, ScoringError) as exc:
        print(f"rubric-fast train: stopped: {exc}", file=sys.stderr)
        return 1
    except CheckpointError as exc:
        print(f"rubric-fast train: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file system error the run could not name a key for (e.g. a full disk)
        print(f"rubric-fast train: {exc.filename or 'I/O'}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # a rank died, or a collective ran past distributed.timeout_s
        if not (isinstance(exc, DistError) or (dist_info().world_size > 1 and _COLLECTIVE_FAILURE.search(str(exc)))):
            raise
        print(f"rubric-fast train: stopped on rank {dist_info().rank}: a collective failed (another rank died, "
              f"or it ran past distributed.timeout_s): {exc}", file=sys.stderr)
        return 1
    finally:
        if installed:
            SIGNALS.restore()
    if dist_info().rank != 0:
        return 0
    r = [x for x in result.rewards if not math.isnan(x)]
    if len(r) >= 20:
        first, last = sum(r[:10]) / 10, sum(r[-10:]) / 10
        print(f"rubric-fast train: done, {result.steps} steps; mean reward first 10 steps {first:.3f} -> "
              f"last 10 steps {last:.3f}; run dir {result.run_dir}", file=sys.stderr)
    else:
        print(f"rubric-fast train: done, {result.steps} steps; run dir {result.run_dir}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rubric-fast train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
