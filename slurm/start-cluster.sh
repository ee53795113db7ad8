#!/usr/bin/env bash
# slurm/start-cluster.sh - start a real, small Slurm cluster on THIS machine, for dragon's tests and for trying
# dragon under Slurm without a real cluster.  Run as root on Debian 12 (or a derivative with Slurm 22.05).
#
#   bash slurm/start-cluster.sh          # install if needed, start, wait until every node is idle
#   bash slurm/stop-cluster.sh           # stop everything this script started
#
# What you get:
#   * Debian's slurmctld, slurmd, slurm-client and munge packages (installed only if missing).
#   * One controller (slurmctld) on the host, reachable at $SUBNET.1.
#   * $NODES compute nodes node1..nodeN. Each slurmd runs in its OWN network, UTS and mount namespace, so every
#     node has its own hostname (`hostname` prints nodeK), its own address ($SUBNET.(10+K)) on a private bridge that
#     exists only inside this machine, its own loopback and its own /dev/shm.  The rest of the file system (/work,
#     /tmp, $HOME, ...) is shared by all nodes, like the shared file system of a real cluster.
#   * MpiDefault=pmi2, so `srun python -c 'from mpi4py import MPI'` gives ranks of one COMM_WORLD with the MPICH
#     wheel (`pip install ".[mpi]"`).  Open MPI would need `srun --mpi=pmix`.
#   * No accounting (`sacct` does not work): use `squeue` and `scontrol show job ID` (kept 5 min after the end).
#
# The script is idempotent: when the cluster is already up it only prints `sinfo`; a half-started cluster from an
# earlier run is stopped first.  Everything it starts is recorded in pid files under $BASE/run so that
# stop-cluster.sh can stop it by pid.
#
# Settings (environment):
#   DRAGON_SLURM_NODES   number of nodes                  (2)
#   DRAGON_SLURM_CPUS    CPUs each node advertises        (4; may exceed the real cores, tasks then share them)
#   DRAGON_SLURM_SUBNET  first three octets of the /24    (10.250.0; must not be a network this machine uses)
#   DRAGON_SLURM_BASE    state, logs, spool, sockets      (/tmp/dragon-slurm)
#   DRAGON_SLURM_WAIT    seconds to wait for idle nodes   (90)
set -euo pipefail

NODES="${DRAGON_SLURM_NODES:-2}"
CPUS="${DRAGON_SLURM_CPUS:-4}"
SUBNET="${DRAGON_SLURM_SUBNET:-10.250.0}"
BASE="${DRAGON_SLURM_BASE:-/tmp/dragon-slurm}"
WAIT_S="${DRAGON_SLURM_WAIT:-90}"
CONF=/etc/slurm/slurm.conf
MARK="# dragon slurm/start-cluster.sh"
BRIDGE=dragonbr0
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MUNGE_DIR="$BASE/munge"
MUNGE_SOCKET="$MUNGE_DIR/socket"
export DEBIAN_FRONTEND=noninteractive
START=$SECONDS

say() { echo "[start-cluster +$((SECONDS - START))s] $*"; }
fail() { echo "start-cluster.sh: ERROR: $*" >&2; exit 1; }

# alive PID NAME: PID exists, is no zombie, and runs the program NAME (a pid file may name a recycled pid)
alive() {
  local exe state
  exe="$(readlink "/proc/$1/exe" 2>/dev/null)" || return 1
  state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
  exe="$(basename "$exe")"
  [ "$state" != Z ] && { [ "$exe" = "$2" ] || [ "${exe%-wlm}" = "$2" ]; }   # Debian: /usr/sbin/slurmd-wlm
}
alive_from() { [ -s "$1" ] && alive "$(cat "$1")" "$2"; }   # alive_from PIDFILE NAME
node_names() { local i; for ((i = 1; i <= NODES; i++)); do echo "node$i"; done; }

[ "$(id -u)" -eq 0 ] || fail "must run as root (it installs packages, creates namespaces and starts daemons)"
[[ "$NODES" =~ ^[1-9][0-9]?$ ]] || fail "DRAGON_SLURM_NODES must be 1..99, got '$NODES'"
[[ "$BASE" == /?* ]] || fail "DRAGON_SLURM_BASE must be an absolute path below /, got '$BASE'"
[[ "$SUBNET" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || fail "DRAGON_SLURM_SUBNET must look like 10.250.0, got '$SUBNET'"

# ------------------------------------------------------------------------------------------------ packages
need=()
for pkg in slurmctld slurmd slurm-client munge iproute2 util-linux; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
  command -v apt-get >/dev/null || fail "missing ${need[*]} and no apt-get to install them"
  say "installing ${need[*]} (apt-get)"
  # the package scripts must not start daemons of their own: a policy-rc.d that says no (removed again after)
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
say "using $(slurmctld -V), munge $(dpkg-query -W -f='${Version}' munge)"

# ------------------------------------------------------------------------------------------------ already up?
cluster_up() {
  alive_from "$MUNGE_DIR/munged.pid" munged && alive_from "$BASE/run/slurmctld.pid" slurmctld || return 1
  local n states
  for n in $(node_names); do alive_from "$BASE/run/slurmd-$n.pid" slurmd || return 1; done
  grep -q "^Epilog=$BASE/etc/epilog.sh\$" "$CONF" && [ -x "$BASE/etc/epilog.sh" ] || return 1   # older start: no epilog
  [ "$(cat "$BASE/nodes" 2>/dev/null)" = "$NODES" ] || return 1
  states="$(timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null | sort -u)" || return 1
  [ "$(echo "$states" | wc -l)" -eq "$NODES" ] || return 1
  ! echo "$states" | awk '{print $2}' | grep -qvE '^(idle|mixed|allocated|completing)$'
}
if grep -qF "$MARK" "$CONF" 2>/dev/null && cluster_up; then
  say "already running"
  sinfo -N -o '%N %T %c %m'
  exit 0
fi
if [ -d "$BASE/run" ] || [ -e "$MUNGE_DIR/munged.pid" ] || ip link show "$BRIDGE" >/dev/null 2>&1; then
  say "stopping what an earlier start left behind"
  bash "$HERE/stop-cluster.sh" || true
fi

# a Slurm that is not ours (other pid files, a system service) would fight over the ports: refuse, say which
for exe in slurmctld slurmd; do
  for p in /proc/[0-9]*; do
    prog="$(basename "$(readlink "$p/exe" 2>/dev/null)")"
    if [ "${prog%-wlm}" = "$exe" ]; then
      fail "another $exe is already running (pid ${p#/proc/}: $(tr '\0' ' ' < "$p/cmdline")); stop it first"
    fi
  done
done

# ------------------------------------------------------------------------------------------------ directories
rm -rf "${BASE:?}/state" "${BASE:?}/spool" "${BASE:?}/tmp" "${BASE:?}/run" "${BASE:?}/log" "${BASE:?}/etc"
mkdir -p "$BASE"/{state,spool,tmp,run,log,etc} "$MUNGE_DIR"
chmod 755 "$BASE"
for n in $(node_names); do mkdir -p "$BASE/spool/$n" "$BASE/tmp/$n"; done

# ------------------------------------------------------------------------------------------------ munge
# Slurm authenticates every message with munge.  munged refuses a key readable by others and a socket directory
# that others cannot enter, so: key 0400 owned by munge, socket directory 0755 owned by munge.
if [ ! -s /etc/munge/munge.key ]; then
  say "creating /etc/munge/munge.key"
  install -d -o munge -g munge -m 700 /etc/munge
  mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
chown munge:munge "$MUNGE_DIR" && chmod 755 "$MUNGE_DIR"
rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
runuser -u munge -- munged --socket="$MUNGE_SOCKET" --pid-file="$MUNGE_DIR/munged.pid" \
  --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
for _ in $(seq 100); do
  munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1 && break
  sleep 0.1
done
munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null \
  || fail "munged does not answer; its log: $(tail -n 5 "$MUNGE_DIR/munged.log" 2>/dev/null)"
say "munged up (pid $(cat "$MUNGE_DIR/munged.pid"))"

# ------------------------------------------------------------------------------------------------ node network
# A bridge on the host carries $SUBNET.0/24; each node namespace gets one end of a veth pair as its eth0.
# Nothing routes this subnet anywhere else: the nodes can reach each other and the controller, nothing more.
if ip route | grep -qE "^$SUBNET\.0/24 " ; then
  fail "$SUBNET.0/24 is already routed on this machine; pick another DRAGON_SLURM_SUBNET"
fi
ip link add "$BRIDGE" type bridge
ip addr add "$SUBNET.1/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
i=0
for n in $(node_names); do
  i=$((i + 1))
  ip netns add "dragon-$n"
  ip link add "dragon-veth$i" type veth peer name eth0 netns "dragon-$n"
  ip link set "dragon-veth$i" master "$BRIDGE" up
  ip -n "dragon-$n" addr add "$SUBNET.$((10 + i))/24" dev eth0
  ip -n "dragon-$n" link set lo up
  ip -n "dragon-$n" link set eth0 up
done
CTL_NAME="$(hostname -s)"
{
  echo "127.0.0.1 localhost"
  echo "$SUBNET.1 $CTL_NAME"
  i=0; for n in $(node_names); do i=$((i + 1)); echo "$SUBNET.$((10 + i)) $n"; done
} > "$BASE/etc/hosts"
echo "$NODES" > "$BASE/nodes"
say "bridge $BRIDGE $SUBNET.1/24, namespaces: $(node_names | sed 's/^/dragon-/' | tr '\n' ' ')"

# ------------------------------------------------------------------------------------------------ slurm.conf
if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
  cp -n "$CONF" "$CONF.before-dragon" && say "kept the earlier $CONF as $CONF.before-dragon"
fi
# The epilog: slurm/dragon-epilog.sh removes what a job's dragon runs left on a node when Slurm SIGKILLed them (see
# slurm/README.md).  A wrapper gives it the Python to use and a log (one line per job and node) for the tests.
PYTHON3="$(python3 -c 'import sys; print(sys.executable)' 2>/dev/null || command -v python3)"
printf '#!/bin/sh\nexport DRAGON_EPILOG_PYTHON=%q DRAGON_EPILOG_LOG=%q\nexec %q\n' \
  "$PYTHON3" "$BASE/log/epilog.log" "$HERE/dragon-epilog.sh" > "$BASE/etc/epilog.sh"
chmod 755 "$BASE/etc/epilog.sh"
mkdir -p /etc/slurm
{
  echo "$MARK: rewritten on every start ($NODES nodes, subnet $SUBNET.0/24)"
  cat <<EOF
ClusterName=dragon-test
SlurmctldHost=$CTL_NAME($SUBNET.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
# each node needs its own job tmp dir, or per-job directories of two nodes on one host collide
TmpFS=$BASE/tmp/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups in a container: track job processes by parentage, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# nodes may advertise more CPUs than the machine has
SlurmdParameters=config_overrides
ReturnToService=2
# MPICH (the mpich wheel) gets its world from PMI-2
MpiDefault=pmi2
# Slurm's default: when one task of a step fails, the others run on (srun -K1 asks for the opposite), and srun
# returns the highest exit code of all tasks
KillOnBadExit=0
# scancel / time limit: SIGTERM, then SIGKILL after KillWait seconds
KillWait=10
OverTimeLimit=0
# on every node of a job, after its processes ended: dragon's clean-up (kills strays, unlinks its /dev/shm files)
Epilog=$BASE/etc/epilog.sh
InactiveLimit=0
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=20
MailProg=/bin/true
EOF
  i=0
  for n in $(node_names); do
    i=$((i + 1))
    echo "NodeName=$n NodeHostname=$n NodeAddr=$SUBNET.$((10 + i)) CPUs=$CPUS RealMemory=4096 State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES DefaultTime=30 MaxTime=INFINITE State=UP"
} > "$CONF"
chmod 644 "$CONF"

# ------------------------------------------------------------------------------------------------ daemons
slurmctld -i -f "$CONF"
for _ in $(seq 150); do timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' \
  || fail "slurmctld did not come up; its log: $(tail -n 8 "$BASE/log/slurmctld.log" 2>/dev/null)"
say "slurmctld up (pid $(cat "$BASE/run/slurmctld.pid"))"

# Each slurmd: enter the node's network namespace, make a private mount + UTS namespace, give it the node's
# /etc/hosts, hostname and an empty /dev/shm of its own, then become slurmd (which daemonizes; its job steps and
# tasks inherit all of this).
for n in $(node_names); do
  nsenter --net="/run/netns/dragon-$n" unshare --mount --uts --propagation private -- sh -ec "
    mount --bind '$BASE/etc/hosts' /etc/hosts
    mount -t tmpfs -o mode=1777 dragon-shm-$n /dev/shm
    hostname '$n'
    exec slurmd -N '$n' -f '$CONF'"
done

deadline=$((SECONDS + WAIT_S))
until [ "$(timeout 10 sinfo -h -N -o '%T' 2>/dev/null | sort -u)" = idle ] \
      && [ "$(timeout 10 sinfo -h -N -o '%N' 2>/dev/null | wc -l)" -eq "$NODES" ]; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    sinfo -N -l || true
    for n in $(node_names); do echo "--- $BASE/log/slurmd-$n.log"; tail -n 8 "$BASE/log/slurmd-$n.log" || true; done
    fail "nodes not idle after ${WAIT_S}s"
  fi
  sleep 0.3
done
for n in $(node_names); do alive_from "$BASE/run/slurmd-$n.pid" slurmd || fail "slurmd of $n has no live pid file"; done
say "slurmd up: $(for n in $(node_names); do printf '%s=%s ' "$n" "$(cat "$BASE/run/slurmd-$n.pid")"; done)"
sinfo -N -o '%N %T %c %m'
out="$(timeout 60 srun -N "$NODES" --ntasks-per-node=1 hostname | sort | tr '\n' ' ')" \
  || fail "smoke test 'srun -N $NODES hostname' failed"
say "srun -N $NODES hostname -> $out"
say "cluster ready ($NODES nodes, $CPUS CPUs each); stop it with: bash $HERE/stop-cluster.sh"
