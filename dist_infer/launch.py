"""Entry point for torchrun: ``torchrun --nproc-per-node N -m dist_infer.launch generate --tp N "prompt"``.

Takes the ``dist-infer`` command line. Rank 0 runs the command as the coordinator (its output is the
command's output); every other rank builds the same engine configuration from the same arguments and runs
the worker loop until rank 0 is done.

``distill`` is the exception: there torchrun's ranks are the student's data-parallel trainers, every rank runs
the command (the teacher runs on rank 0 alone, with its own executor), so nothing is added to its arguments.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from dist_infer.entrypoints import cli

    if "distill" in argv[:2]:
        return cli.main(argv)
    if "--executor" not in argv and "--distributed-executor-backend" not in argv:
        argv += ["--distributed-executor-backend", "torchrun"]
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        return cli.main(argv)
    return cli.run_worker(argv)


if __name__ == "__main__":
    sys.exit(main())
