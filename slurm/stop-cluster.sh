#!/usr/bin/env bash
# slurm/stop-cluster.sh - stop the test cluster that slurm/start-cluster.sh started, and leave nothing running.
#
#   bash slurm/stop-cluster.sh
#
# 1. cancels every job while the controller still answers, and waits for the job steps to end;
# 2. stops each slurmd, the slurmctld and munged by the pid in its pid file (after checking that the pid still runs
#    that program), SIGTERM first, SIGKILL after 15 s;
# 3. ends whatever still runs inside a node's network namespace (a task that escaped Slurm), then removes the
#    namespaces, the veth pairs and the bridge.
# Logs stay in $DRAGON_SLURM_BASE/log (default /tmp/dragon-slurm/log); DRAGON_SLURM_PURGE=1 removes the whole
# directory.  Safe to run when nothing is running.  Exits non-zero if anything it started is still there at the end.
set -uo pipefail

BASE="${DRAGON_SLURM_BASE:-/tmp/dragon-slurm}"
BRIDGE=dragonbr0
MUNGE_DIR="$BASE/munge"
START=$SECONDS

say() { echo "[stop-cluster +$((SECONDS - START))s] $*"; }
alive() {   # alive PID [NAME]: exists, no zombie, and (if NAME is given) runs the program NAME
  local exe state
  state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
  [ -n "$state" ] && [ "$state" != Z ] || return 1
  [ -z "${2:-}" ] && return 0
  exe="$(readlink "/proc/$1/exe" 2>/dev/null)" || return 1
  exe="$(basename "$exe")"
  [ "${exe%-wlm}" = "$2" ]   # Debian installs /usr/sbin/slurmd-wlm, /usr/sbin/slurmctld-wlm
}
pid_from() { [ -s "$1" ] && alive "$(cat "$1")" "$2" && cat "$1"; }   # pid_from PIDFILE NAME
our_netns() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^dragon-node[0-9]+$' || true; }

terminate() {   # terminate WHAT PID...: SIGTERM, wait up to 15 s, then SIGKILL
  local what="$1" pid left
  shift
  [ "$#" -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null
  for _ in $(seq 150); do
    left=()
    for pid in "$@"; do alive "$pid" && left+=("$pid"); done
    [ "${#left[@]}" -eq 0 ] && { say "stopped $what (pid $*)"; return 0; }
    sleep 0.1
  done
  kill -KILL "${left[@]}" 2>/dev/null
  sleep 0.3
  say "killed $what (pid ${left[*]}) after 15 s"
}

[ "$(id -u)" -eq 0 ] || { echo "stop-cluster.sh: must run as root" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------- 1. jobs
if pid_from "$BASE/run/slurmctld.pid" slurmctld >/dev/null; then
  jobs="$(timeout 10 squeue -h -o %A 2>/dev/null | tr '\n' ' ')"
  if [ -n "${jobs// /}" ]; then
    say "cancelling jobs $jobs"
    # shellcheck disable=SC2086
    timeout 10 scancel $jobs 2>/dev/null
    for _ in $(seq 200); do [ -z "$(timeout 10 squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.1; done
  fi
  # a job step's slurmstepd keeps a socket named <node>_<job>.<step> in the node's spool dir until it ends
  for _ in $(seq 150); do compgen -G "$BASE/spool/*/node*_*" >/dev/null || break; sleep 0.1; done
fi

# ---------------------------------------------------------------------------------------------- 2. daemons
pids=()
for f in "$BASE"/run/slurmd-*.pid; do p="$(pid_from "$f" slurmd)" && pids+=("$p"); done
terminate "slurmd" "${pids[@]}"
p="$(pid_from "$BASE/run/slurmctld.pid" slurmctld)" && terminate slurmctld "$p"
p="$(pid_from "$MUNGE_DIR/munged.pid" munged)" && terminate munged "$p"

# ---------------------------------------------------------------------------------------------- 3. namespaces
for ns in $(our_netns); do
  left=()
  for p in $(ip netns pids "$ns" 2>/dev/null); do alive "$p" && left+=("$p"); done
  if [ "${#left[@]}" -gt 0 ]; then
    terminate "leftovers in $ns: $(for p in "${left[@]}"; do tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | cut -c1-50; echo -n '; '; done)" "${left[@]}"
  fi
  ip netns del "$ns" 2>/dev/null || say "WARNING: could not delete netns $ns"
done
for l in $(ip -o link show 2>/dev/null | grep -oE 'dragon-veth[0-9]+' | sort -u); do ip link del "$l" 2>/dev/null; done
ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE"

# ---------------------------------------------------------------------------------------------- verify
bad=""
for f in "$BASE"/run/*.pid "$MUNGE_DIR/munged.pid"; do
  [ -s "$f" ] && alive "$(cat "$f")" && bad="$bad pid $(cat "$f") ($f)"
done
[ -n "$(our_netns)" ] && bad="$bad netns: $(our_netns | tr '\n' ' ')"
ip link show "$BRIDGE" >/dev/null 2>&1 && bad="$bad bridge $BRIDGE"
rm -f "$BASE"/run/*.pid "$MUNGE_DIR/munged.pid" "$BASE/nodes"
rmdir "$BASE/run" 2>/dev/null
if [ -n "$bad" ]; then
  echo "stop-cluster.sh: ERROR: still there:$bad" >&2
  exit 1
fi
if [ "${DRAGON_SLURM_PURGE:-0}" = 1 ] && [[ "$BASE" == /?* ]]; then rm -rf "${BASE:?}"; say "removed $BASE"; fi
say "cluster stopped, nothing left running"
