#!/bin/sh
# slurm/dragon-epilog.sh - a Slurm epilog that removes what dragon jobs left on a node (site admins: see below).
#
# Why: on `scancel JOBID` and at a job's time limit Slurm sends SIGTERM to every process of the job at once and
# SIGKILLs what is left KillWait seconds later (see slurm/README.md).  dragon tears down within those seconds, but
# a teardown slower than KillWait, `scancel --signal=KILL`, or a process that left the step's process tree can
# still leave files in the node's /dev/shm (RAM!) until the node reboots.  An epilog runs on every node of a job
# after Slurm has ended the job's processes, as root, whatever the job did, so it can finish the clean-up:
#   - kill every process whose environment has DRAGON_JOB=s<SLURM_JOB_ID>_... (processes that left the job's
#     process tree, which Slurm's proctrack/linuxproc cannot find);
#   - unlink /dev/shm/dragon-s<SLURM_JOB_ID>_* (dragon names every segment after the Slurm job it runs in);
#   - unlink the MPI library's segments (mpich_shm_*) of the job's user that no live process maps or holds open.
# Nothing else is touched.  The script always exits 0: a failing epilog makes Slurm drain the node.
#
# Enable it (site admin, on every compute node):
#   1. make this file and dragon's launcher/cleanup.py readable on the nodes (a shared file system is fine; the
#      clean-up needs only Python 3's standard library, not dragon's compiled parts).  The epilog runs as root:
#      both files (and the directories above them) must be writable by root only, e.g. a root-owned copy in
#      /etc/slurm or /opt, never a user's checkout;
#   2. in slurm.conf:  Epilog=/path/to/dragon/slurm/dragon-epilog.sh
#      (a site that already has an epilog calls this script from it, or uses a directory: Epilog=/etc/slurm/epilog.d/*)
#   3. `scontrol reconfigure`.
# Settings (environment of slurmd, or edit the defaults here):
#   DRAGON_EPILOG_PYTHON   the Python 3 to run           (python3 on PATH)
#   DRAGON_EPILOG_CLEANUP  dragon's launcher/cleanup.py  (the one next to this script: ../launcher/cleanup.py)
#   DRAGON_EPILOG_LOG      append a line per job here    (no log)
#   DRAGON_EPILOG_MPI      0 = leave MPI segments alone  (1)

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${DRAGON_EPILOG_PYTHON:-python3}
CLEANUP=${DRAGON_EPILOG_CLEANUP:-$HERE/../launcher/cleanup.py}
LOG=${DRAGON_EPILOG_LOG:-/dev/null}

case "${SLURM_JOB_ID:-}" in
  '' | *[!0-9]*) echo "dragon-epilog: no SLURM_JOB_ID, nothing to do" >>"$LOG" 2>/dev/null; exit 0 ;;
esac
set -- --slurm-job "$SLURM_JOB_ID"
case "${SLURM_JOB_UID:-}" in
  '' | *[!0-9]*) ;;
  *) [ "${DRAGON_EPILOG_MPI:-1}" = 0 ] || set -- "$@" --mpi-uid "$SLURM_JOB_UID" ;;
esac
# bounded: Slurm waits for the epilog before it gives the node to the next job
timeout 60 "$PY" "$CLEANUP" "$@" >>"$LOG" 2>&1 \
  || echo "dragon-epilog: slurm job $SLURM_JOB_ID on ${SLURMD_NODENAME:-?}: clean-up failed ($?)" >>"$LOG" 2>/dev/null
exit 0
