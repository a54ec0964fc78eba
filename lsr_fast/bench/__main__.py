"""``python -m lsr_fast.bench [options]``: the same as ``lsr-fast bench``."""

import sys

from lsr_fast.bench.command import main

sys.exit(main())
