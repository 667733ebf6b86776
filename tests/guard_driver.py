"""Run ``rankwise`` (``core.cli.main``) with a save the tests can catch in the middle.

Used by tests/test_guard.py as ``python tests/guard_driver.py MODE ARGS…`` (not a test module):

* ``slow``: the LoRA writer writes the header into the temp file and then waits (up to 60 s) before
  writing the rest, so a test can send SIGINT/SIGTERM while the temp file exists.
* ``race``: the writer writes the whole temp file, leaves a marker in ``$RANKWISE_RACE_DIR`` and waits
  until a second run's marker is there (up to 20 s), so two runs reach the no-overwrite publish together.
"""

from __future__ import annotations

import glob
import os
import sys
import time


def main() -> int:
    mode, argv = sys.argv[1], sys.argv[2:]
    from rankwise.core import io

    real_write_plan = io.write_plan

    def slow(path, plan, fsync=True):
        with open(path, "wb") as f:
            f.write(plan.header)
            f.flush()
        print(f"writing {path}", file=sys.stderr, flush=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.02)
        real_write_plan(path, plan, fsync=fsync)

    def racing(path, plan, fsync=True):
        real_write_plan(path, plan, fsync=fsync)
        ready = os.environ["RANKWISE_RACE_DIR"]  # a folder of its own: markers that stay
        open(os.path.join(ready, f"{os.getpid()}.ready"), "w").close()
        deadline = time.monotonic() + 20
        while len(glob.glob(os.path.join(glob.escape(ready), "*.ready"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)

    io.write_plan = {"slow": slow, "race": racing}[mode]
    from rankwise.core.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
