"""`antisd ARGS` as one rank of a launch, with a SIGKILL armed (tests only): rank RANK kills itself when it is about
to write its part of artifact ARTIFACT at step STEP (computed, not yet written); the launcher then stops the others.

Usage: torchrun --nproc-per-node 2 tests/rank_killer.py RANK ARTIFACT STEP loop ARGS...
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def main() -> None:
    rank, artifact, step = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    import stages.common.io as io

    original = io.write_artifact

    def write_artifact(table, path, kind, metadata):
        part = Path(path)
        if (int(os.environ.get("RANK", "0")) == rank and kind == artifact and part.parent.name.endswith(".parts")
                and part.parent.parent.name == f"step_{step:04d}"):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(table, path, kind, metadata)

    io.write_artifact = write_artifact  # before the stages import it (they import it lazily, with their module)
    from antisd_cli.main import cli

    cli(sys.argv[4:])


if __name__ == "__main__":
    main()
