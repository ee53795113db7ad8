#!/usr/bin/env bash
# tools/test-all.sh - install dragon with its test dependencies and run the WHOLE test suite, Slurm tests included.
#
#   bash tools/test-all.sh                 # as root, on a fresh Debian 12 machine: this is all it takes
#   bash tools/test-all.sh -k channel      # extra arguments go to pytest
#
# Steps:
#   1. pip install -e ".[test]"  (builds the Cython extension in place; brings pytest, pytest-timeout, numpy,
#      faster-fifo, mpi4py and the mpich wheel, whose mpiexec lands next to python; `pyenv rehash` makes the
#      console scripts dragon-launch / dragon-bench / mpiexec visible when python comes from pyenv)
#   2. slurm/start-cluster.sh: installs Debian's Slurm + munge if missing and starts a real 2-node cluster on this
#      machine.  If it cannot start, that is a failure, not a skipped test.
#   3. python -m pytest -ra (per-test timeouts from pytest-timeout, default 120 s in pyproject.toml); the Slurm
#      tests must run (DRAGON_REQUIRE_SLURM=1 makes a missing cluster fail them instead of skipping them).
#   4. on exit (also on failure or Ctrl-C): stops the cluster if this script started it (a cluster that was
#      already running is left running), then ends any process the tests left behind and fails if there was one.
#
# Exit code: pytest's (0 = all passed; 1 = a test failed; 5 = no test ran, which is a failure here too),
# or non-zero when installing or starting Slurm failed, or when processes were left behind.
#
# Settings: PYTHON (python3), DRAGON_TEST_TIMEOUT (whole pytest run, seconds, 2700),
#           DRAGON_TEST_SKIP_INSTALL=1 (reuse the installed package), DRAGON_TEST_NO_SLURM=1 (no cluster: the
#           Slurm tests are skipped; refused under CI=true).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
PY="${PYTHON:-python3}"
TOTAL_TIMEOUT="${DRAGON_TEST_TIMEOUT:-2700}"
SLURM_BASE="${DRAGON_SLURM_BASE:-/tmp/dragon-slurm}"
RUN_ID="test-all-$$-$(date +%s)"
LOG="$(mktemp /tmp/dragon-test-all.XXXXXX.log)"
T0=$SECONDS
started_slurm=0
TEST_PID=""
TAIL_PID=""
is_ci=0; case "${CI:-}" in 1|true|TRUE|True|yes) is_ci=1 ;; esac

say() { echo "[test-all +$((SECONDS - T0))s] $*"; }

# Every process the tests start inherits TESTALL_RUN_ID (deliberately not DRAGON_*: tests strip those from the
# environments they give dragon-launch), so whatever still carries it after pytest ended was left behind.
leftovers() {   # processes (not this script's) whose environment carries this run's id
  local p
  for p in /proc/[0-9]*; do
    p="${p#/proc/}"
    [ "$p" = "$$" ] && continue
    grep -qaF "TESTALL_RUN_ID=$RUN_ID" "/proc/$p/environ" 2>/dev/null || continue
    [ "$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null)" = Z ] && continue
    echo "$p"
  done
}

finish() {
  local rc=$?
  trap - EXIT INT TERM
  unset TESTALL_RUN_ID
  if [ -n "$TEST_PID" ] && kill -0 "$TEST_PID" 2>/dev/null; then
    say "interrupted: stopping pytest (pid $TEST_PID)"
    kill -TERM "$TEST_PID" 2>/dev/null   # timeout passes it on to pytest
    for _ in $(seq 100); do kill -0 "$TEST_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$TEST_PID" 2>/dev/null
    [ -n "$TAIL_PID" ] && { kill "$TAIL_PID" 2>/dev/null; wait "$TAIL_PID" 2>/dev/null; }
  fi
  if [ "$started_slurm" = 1 ]; then
    say "stopping the Slurm cluster this run started"
    bash "$REPO/slurm/stop-cluster.sh" || { echo "test-all: ERROR: stop-cluster.sh failed" >&2; [ "$rc" = 0 ] && rc=1; }
  fi
  local left
  left="$(leftovers | tr '\n' ' ')"
  if [ -n "${left// /}" ]; then
    echo "test-all: ERROR: the tests left processes running; ending them:" >&2
    for p in $left; do echo "  $p: $(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | cut -c1-120)" >&2; done
    # shellcheck disable=SC2086
    kill -TERM $left 2>/dev/null; sleep 2
    left="$(leftovers | tr '\n' ' ')"
    # shellcheck disable=SC2086
    [ -n "${left// /}" ] && kill -KILL $left 2>/dev/null
    [ "$rc" = 0 ] && rc=1
  fi
  # repeat pytest's closing line last, so that it is the last thing a reader (or CI) sees
  local closing
  closing="$(grep -E '^=+ .*(passed|failed|error|skipped|no tests ran|deselected).* in [0-9.]+s' "$LOG" 2>/dev/null | tail -n 1)"
  rm -f "$LOG"
  say "done, exit code $rc"
  [ -n "$closing" ] && echo "$closing"
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------------------------------------ 1. install
usable_python() {   # a Python that pip may install into: has pip, and is a venv or not marked externally managed
  "$1" - <<'EOF' >/dev/null 2>&1
import os, sys, sysconfig
import pip  # noqa: F401
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(1 if managed and sys.prefix == sys.base_prefix else 0)
EOF
}
if [ -z "${PYTHON:-}" ] && ! usable_python "$PY"; then
  # python3 on PATH is the distribution's own (no pip, or pip refuses): use pyenv's if there is one
  shims="${PYENV_ROOT:-$HOME/.pyenv}/shims"
  if [ -x "$shims/python3" ] && usable_python "$shims/python3"; then
    say "$(command -v "$PY") is the system's own Python; using $shims/python3"
    export PATH="$shims:$PATH"
  else
    echo "test-all: ERROR: $PY cannot take pip installs; set PYTHON=/path/to/python (a venv's is fine)" >&2
    exit 1
  fi
fi
if [ "${DRAGON_TEST_SKIP_INSTALL:-0}" = 1 ]; then
  say "DRAGON_TEST_SKIP_INSTALL=1: using the installed package"
else
  say "pip install -e .[test] with $("$PY" -c 'import sys; print(sys.executable)')"
  if ! "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore -e ".[test]"; then
    echo "test-all: ERROR: pip install -e .[test] failed" >&2
    exit 1
  fi
fi
if command -v pyenv >/dev/null 2>&1; then pyenv rehash >/dev/null 2>&1 || true; fi
"$PY" -c 'import dragon, dragon._core.core, launcher' \
  || { echo "test-all: ERROR: the installed package does not import" >&2; exit 1; }
for tool in dragon-launch mpiexec; do
  command -v "$tool" >/dev/null || { echo "test-all: ERROR: $tool is not on PATH after the install" >&2; exit 1; }
done
say "installed: $("$PY" -m pip --disable-pip-version-check list 2>/dev/null | grep -iE '^(dragon-rt|mpi4py|mpich|pytest|pytest-timeout) ' | awk '{printf "%s %s, ", $1, $2}')"

# ------------------------------------------------------------------------------------------------ 2. Slurm
if [ "${DRAGON_TEST_NO_SLURM:-0}" = 1 ]; then
  [ "$is_ci" = 1 ] && { echo "test-all: ERROR: DRAGON_TEST_NO_SLURM=1 is not allowed under CI" >&2; exit 1; }
  say "DRAGON_TEST_NO_SLURM=1: no cluster, the Slurm tests will be skipped"
else
  [ "$(id -u)" -eq 0 ] || { echo "test-all: ERROR: run as root (Slurm needs it), or set DRAGON_TEST_NO_SLURM=1" >&2; exit 1; }
  pidf="$SLURM_BASE/run/slurmctld.pid"
  ctl_exe="$(readlink "/proc/$(cat "$pidf" 2>/dev/null)/exe" 2>/dev/null)" || ctl_exe=""
  if [[ "$(basename "$ctl_exe")" == slurmctld* ]]; then   # a pid file left by a killed cluster may name another program
    say "a test cluster is already running: using it and leaving it running"
  else
    started_slurm=1
  fi
  if ! bash "$REPO/slurm/start-cluster.sh"; then
    echo "test-all: ERROR: the Slurm test cluster did not start (logs: $SLURM_BASE/log)" >&2
    exit 1
  fi
  export DRAGON_REQUIRE_SLURM=1
fi

# ------------------------------------------------------------------------------------------------ 3. pytest
export TESTALL_RUN_ID="$RUN_ID"
say "python -m pytest -ra $* (whole run limited to ${TOTAL_TIMEOUT}s)"
# pytest runs in the background and its output is followed from the log, so that a SIGTERM or SIGINT to this
# script is handled at once (bash runs traps only between commands, and `wait` is interruptible)
timeout -k 30 "$TOTAL_TIMEOUT" "$PY" -m pytest -ra --durations=10 "$@" > "$LOG" 2>&1 < /dev/null &
TEST_PID=$!
unset TESTALL_RUN_ID
tail -n +1 -f --pid="$TEST_PID" "$LOG" &
TAIL_PID=$!
wait "$TEST_PID"
rc=$?
wait "$TAIL_PID"
TEST_PID=""
case "$rc" in
  0) ;;
  5) echo "test-all: ERROR: pytest ran no test (exit 5): the suite must not be empty" >&2 ;;
  124|137) echo "test-all: ERROR: the test run hit its ${TOTAL_TIMEOUT}s limit" >&2 ;;
  *) echo "test-all: pytest exit code $rc" >&2 ;;
esac
exit "$rc"
