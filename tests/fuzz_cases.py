"""Command line of the fuzzer in tests/fuzz/ (the contract and the layout are in its docstring).

The parent runs this script in its child processes, and the replay command a report prints names it:

    python tests/fuzz_cases.py --group raw                 # one group, in a watched child
    python tests/fuzz_cases.py --group raw --unit 'raw.hist_downsample | threshold=nan'
    python tests/fuzz_cases.py --group raw --list          # the units of a group
"""

import sys

from fuzz.child import main

if __name__ == "__main__":
    sys.exit(main())
