"""dragon: processes, shared-memory pools and lock-free channels across the nodes of an HPC allocation."""

__version__ = "0.1.0"
