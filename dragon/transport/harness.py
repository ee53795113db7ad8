"""Run a program once per node with the transport only (no global or local services): for tests and the
benchmark.

    mpiexec -n N python -m dragon.transport.harness [--virtual-nodes] PROGRAM [ARGS...]

Each node's leader rank makes the node's infrastructure pool, gateway channel and two test channels ("a":
capacity 1024, block 1024; "small": capacity 4), starts its transport agent, and runs ``python PROGRAM ARGS``
with DRAGON_NODE, DRAGON_JOB, DRAGON_GW_CD, DRAGON_INF_PD and DRAGON_TEST_CHANS (json {node: {name: hex
sdesc}} of every node's test channels) and DRAGON_NNODES. When every node's program has exited, the agents
stop (in step: see ``Agent._finish``), the segments go, and each rank exits with its program's exit code; a
leader that does not see the others at the end within FINAL_BARRIER seconds says so and exits without
MPI_Finalize. A node whose rank died is lost (MPI refuses a send to it, or its agent is silent for 15 s):
every other node's program is stopped (SIGTERM) and its rank exits at once, with its program's code or 1.
"""

import json
import os
import signal
import subprocess
import sys
import threading

from dragon import env as E

POOL_SIZE = 256 << 20
FINAL_BARRIER = 30.0  # how long the node leaders wait for each other at the end (the agents have stopped)
HEARTBEAT = (1.0, 15.0)  # the agents beat every second; one silent for 15 s is lost (as under dragon-launch)


def _env_for(world, node, gw, pool, chans):
    return {
        **os.environ,
        E.NODE: str(node),
        E.NNODES: str(world.nnodes),
        E.GW_CD: bytes(gw.sdesc).hex(),
        E.INF_PD: bytes(pool.sdesc).hex(),
        E.TEST_CHANS: json.dumps(chans),
    }


def _run_program(cmd, env, lost):
    """Run the node's program -> its exit code. SIGTERM (mpiexec or srun passing on a kill, a time limit),
    Ctrl-C or a lost node (the Event lost) stops it (SIGTERM, then SIGKILL after 10 s) and returns 128 + the
    signal, so that the agents still stop together and the node's segments are removed."""
    proc = subprocess.Popen(cmd, env=env)
    got = []

    def on_term(signum, frame):
        got.append(signum)
        raise KeyboardInterrupt

    def stop():
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        except OSError:
            pass

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        while True:
            try:
                return proc.wait(0.2)
            except subprocess.TimeoutExpired:
                if lost.is_set():
                    stop()
                    return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        stop()
        return 128 + (got[0] if got else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, old)


def run(argv, virtual, before=None):
    """before(world, comm): called on every rank after the world is known, before the agents start (the
    benchmark measures raw MPI there). Returns this rank's exit code."""
    from dragon.transport.world import World, end_rank, init_mpi, node_cpu_binding, wait_barrier

    MPI = init_mpi()

    comm = MPI.COMM_WORLD
    world = World(comm, virtual)
    # (inside a Slurm job the id starts with s<SLURM_JOB_ID>_: the epilog removes what a killed rank left)
    job, key = comm.bcast((E.new_job_id(kind="t"), os.urandom(8)) if world.rank == 0 else None, root=0)
    if before is not None:
        before(world, comm)
    # the leaders' communicator: node k's agent is its rank k
    leaders = comm.Split(0 if world.leader else MPI.UNDEFINED, world.rank)
    if not world.leader:
        wait_barrier(comm)  # (as long as the job runs)
        return 0
    node_cpu_binding(world)  # as dragon-launch: the node's agent and program get the node's CPUs
    os.environ[E.JOB] = world.job_of_node(job)
    os.environ[E.NODE] = str(world.node)
    from dragon._core import frames as W
    from dragon.channels import Channel
    from dragon.infrastructure import messages as m
    from dragon.pools import Pool
    from dragon.transport.agent import FINISH_WAIT, Agent, start_thread

    pool = Pool.create(POOL_SIZE, name="inf")
    gw = Channel.create(pool, capacity=4096, block_size=1024 + W.HSIZE, name="gateway")
    a = Channel.create(pool, capacity=1024, block_size=1024, name="a")
    small = Channel.create(pool, capacity=4, block_size=64, name="small")
    mine = {"a": bytes(a.sdesc).hex(), "small": bytes(small.sdesc).hex()}
    allch = leaders.allgather(mine)
    chans = {str(k): v for k, v in enumerate(allch)}
    agent = Agent(leaders, world.node, list(range(world.nnodes)), gw, pool)
    done = {}
    lost = threading.Event()  # a node's agent fell silent: its rank is gone, the job cannot end in step

    def node_down(k):
        why = agent.down_why.get(k, "announced down")
        _say(f"node {k} is lost ({why}): this node's program is stopped and the job ends")
        lost.set()

    def program_done(msg):
        done[msg.node] = msg.exit_code
        if len(done) == world.nnodes:
            for k in range(world.nnodes):
                agent._ctrl(k, m.encode(m.LAExit(key=key)))

    def stop(msg):
        agent.running = False  # (it then stops in step with the other agents: see Agent._finish)

    handlers = {m.LAProgramDone: program_done, m.LAExit: stop}

    def on_ctrl(src, data):
        msg = m.decode(data)
        if msg.CONTROL and msg.key == key and type(msg) in handlers:
            handlers[type(msg)](msg)

    agent.on_ctrl = on_ctrl
    agent.on_node_down = node_down
    agent.heartbeat = HEARTBEAT
    t = start_thread(agent)
    env = _env_for(world, world.node, gw, pool, chans)
    code = _run_program([sys.executable, *argv], env, lost)
    agent.send_ctrl(0, m.encode(m.LAProgramDone(key=key, node=world.node, exit_code=code)))
    while t.is_alive() and not lost.is_set():  # (node 0's LAExit, once every program ended, stops the agent)
        t.join(0.1)
    agent.stop()
    t.join(FINISH_WAIT + 5)
    for ch in (gw, a, small):
        try:
            ch.destroy()
        except Exception:
            pass
    pool.destroy()
    if lost.is_set():
        code = code or 1
    end_rank(comm, 0 if lost.is_set() else FINAL_BARRIER, code, _say)  # (a lost rank never comes)
    return code


def _say(text):
    print(f"dragon.transport.harness: {text}", file=sys.stderr, flush=True)


def main():
    args = sys.argv[1:]
    virtual = False
    if args and args[0] == "--virtual-nodes":
        virtual, args = True, args[1:]
    if not args:
        sys.exit(__doc__)
    sys.exit(run(args, virtual))


if __name__ == "__main__":
    main()
