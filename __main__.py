"""``python -m rankwise …``: the same as the ``rankwise`` script."""

import sys

from rankwise.core.cli import main

if __name__ == "__main__":
    sys.exit(main())
