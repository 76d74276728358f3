"""Start the ranks a hardware profile asks for; all ranks share one run directory."""
from launchers.local import launch, worker_main

__all__ = ["launch", "worker_main"]
