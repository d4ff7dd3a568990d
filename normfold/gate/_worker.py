"""Entry point of a process-executor worker: ``python -m normfold.gate._worker FD``."""

from __future__ import annotations

import sys

from normfold.gate.executors import worker_main

if __name__ == "__main__":
    worker_main(int(sys.argv[1]))
