"""``python -m benchmarks`` and the ``dragon-bench`` console script."""

import sys

from benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main())
