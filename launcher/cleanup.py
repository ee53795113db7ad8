"""The launcher's clean-up helpers (they live in dragon.infrastructure.jobprocs, shared with the shepherd)."""

from dragon.infrastructure.jobprocs import children, job_pids, kill_all

__all__ = ["children", "job_pids", "kill_all"]
