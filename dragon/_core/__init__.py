"""dragon._core: the data plane (shared-memory pools and lock-free channels), compiled from core.pyx + dshm.h.

Imports nothing of the project but dragon.errors.
"""

from dragon._core.core import (  # noqa: F401
    Block,
    Channel,
    Message,
    Pool,
    job_id,
    job_prefix,
    set_child_subreaper,
    set_pdeathsig,
    set_wait_params,
    unlink_job_segments,
    wait_stats,
)
