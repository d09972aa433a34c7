"""``python -m rubric_fast ...``: the same as the ``rubric-fast`` command."""

import sys

from .cli import main

sys.exit(main())
