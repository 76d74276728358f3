"""A rank worker: ``python -m launchers.worker <run_dir>/config.yaml`` (started by a launcher)."""
import sys

from launchers.local import worker_main

if __name__ == "__main__":
    worker_main(sys.argv[1])
