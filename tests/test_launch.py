"""dragon-launch itself: --help, bad command lines, exit codes, programs that are not Python, the example."""

import os
import subprocess
import sys

import pytest
from test_runtime_util import REPO, launch_cmd, launch_env, run_app


def _run(*args, cwd=None, timeout=30):
    return subprocess.run(
        launch_cmd(*args),
        cwd=cwd,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_help():
    r = _run("--help")
    assert r.returncode == 0
    assert "usage: dragon-launch" in r.stdout and "exit code" in r.stdout and "--grace" in r.stdout


def test_bad_command_lines(tmp_path):
    r = _run()
    assert r.returncode == 2 and "program" in r.stderr
    r = _run(str(tmp_path / "missing.py"))
    assert r.returncode == 2 and "missing.py" in r.stderr
    for bad in ("-1", "inf", "nan"):  # (inf: a teardown that never ended, even on SIGTERM)
        r = _run("--grace", bad, "x.py")
        assert r.returncode == 2 and "--grace must be" in r.stderr, (bad, r.stderr)
    r = _run("--bogus", "x.py")
    assert r.returncode == 2 and "--bogus" in r.stderr
    r = _run("-m")
    assert r.returncode == 2 and "module" in r.stderr
    r = _run("/nonexistent/program")  # not a .py: started as an executable, which cannot start
    assert r.returncode == 70 and "/nonexistent/program" in r.stderr


def test_a_closed_stdout_is_not_a_failure(tmp_path):
    """dragon-launch app.py >&-: the program's exit code, as python gives it (it was 70: the launcher
    flushed a sys.stdout that is None); the closed descriptors become /dev/null, so no file the runtime opens
    takes number 1 and receives the forwarded output."""
    app = tmp_path / "app.py"
    app.write_text("import sys\nprint('x')\nsys.exit(5)\n")
    for fd in (1, 0):
        p = subprocess.run(
            launch_cmd(str(app)), cwd=tmp_path, env=launch_env(), stderr=subprocess.PIPE, text=True,
            timeout=60, preexec_fn=lambda fd=fd: os.close(fd),
        )  # fmt: skip
        assert p.returncode == 5 and "failed" not in p.stderr, (fd, p.stderr)


@pytest.mark.timeout(120)
def test_forwarded_output_to_a_non_blocking_stdout_is_not_dropped(tmp_path):
    """The O_NONBLOCK flag of a stdout is shared by every process holding it (the program may set it): the
    shepherd took EAGAIN and short writes as "dropped" (899 of 80,000 lines arrived behind a slow reader)."""
    app = tmp_path / "app.py"
    app.write_text(
        "import fcntl, os, sys\n"
        "from dragon.globalservices import process\n"
        "fcntl.fcntl(1, fcntl.F_SETFL, fcntl.fcntl(1, fcntl.F_GETFL) | os.O_NONBLOCK)\n"
        'code = \'import sys\\nfor i in range(20000): print(f"{sys.argv[1]}:{i}:" + "y" * 60)\'\n'
        "ps = [process.create(sys.executable, None, ['-c', code, f'w{k}']) for k in range(3)]\n"
        "assert [process.join(p.p_uid) for p in ps] == [0, 0, 0]\n"
    )
    slow = "import sys, time; time.sleep(3); data = sys.stdin.buffer.read(); sys.stdout.buffer.write(data)"
    cmd = " ".join(launch_cmd(str(app))) + f" | {sys.executable} -c '{slow}'"
    p = subprocess.run(cmd, shell=True, cwd=tmp_path, env=launch_env(), capture_output=True, timeout=100)
    lines = p.stdout.decode().splitlines()
    assert p.returncode == 0, p.stderr
    for k in range(3):
        got = [x for x in lines if x.startswith("[") and f"] w{k}:" in x]
        assert len(got) == 20000 and got[-1].endswith(f"w{k}:19999:" + "y" * 60), (k, len(got), got[-1:])


def test_module_program(tmp_path):
    (tmp_path / "mymod.py").write_text("import sys; print('mod', sys.argv[1:]); sys.exit(6)")
    r = _run("--grace", "0.5", "-m", "mymod", "--help", "x", cwd=tmp_path)
    assert r.returncode == 6 and r.stdout == "mod ['--help', 'x']\n", r


def test_executable_program_and_args(tmp_path):
    r = _run("/bin/sh", "-c", "echo from sh $0 $1; exit 4", "a", "b", cwd=tmp_path)
    assert r.returncode == 4 and r.stdout == "from sh a b\n", r


@pytest.mark.parametrize(
    "code,expected",
    [("import sys; sys.exit(9)", 9), ("import os, signal; os.kill(os.getpid(), signal.SIGUSR1)", 128 + 10)],
)
def test_exit_code_propagates(tmp_path, code, expected):
    r = run_app(tmp_path, code)
    assert r.returncode == expected, r.stderr


def test_program_args_and_stdin(tmp_path):
    r = run_app(tmp_path, "import sys; print(sys.argv[1:], sys.stdin.read())", args=["x", "--y", "-h"])
    assert r.returncode == 0 and r.stdout == "['x', '--y', '-h'] \n", r


def test_hello_example(tmp_path):
    r = subprocess.run(
        launch_cmd(os.path.join(REPO, "examples", "hello.py"), "3"),
        cwd=tmp_path,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    for i in range(3):
        assert f"hello from worker {i}" in r.stdout and f"[worker{i}] worker {i} is p_uid" in r.stdout
    assert "workers exited with [0, 0, 0]" in r.stdout


def test_forwarded_output_arrives_while_the_process_runs(tmp_path):
    import queue
    import signal
    import threading
    import time

    from test_runtime_util import write_app

    app = write_app(
        tmp_path,
        """
        import sys, time
        from dragon.globalservices import process as P
        code = "import time; print('early'); time.sleep(30)"
        P.create(sys.executable, None, ["-c", code], user_name="streamer")
        time.sleep(30)
        """,
    )
    proc = subprocess.Popen(
        launch_cmd(str(app)), cwd=tmp_path, env=launch_env(), stdout=subprocess.PIPE, text=True
    )
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        assert lines.get(timeout=15) == "[streamer] early\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
        assert time.monotonic() - t0 < 5


# ---- the multi-node layout rules (dragon.transport.world), with given environments and host lists
# -------------
def test_node_name_is_slurms_only_when_srun_started_this_rank():
    from dragon.transport.world import node_name

    srun = {
        "SLURMD_NODENAME": "nid01",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "1",
        "SLURM_STEP_NUM_TASKS": "3",
    }
    assert node_name(srun, 1, 3, uname="host-b") == "nid01"
    # the sbatch shell's variables, copied by mpiexec to every rank: not this rank's own
    assert node_name(srun, 2, 3, uname="host-c") == "host-c"  # SLURM_PROCID is another rank's
    assert node_name(srun, 1, 4, uname="host-b") == "host-b"  # the step is not this MPI world
    batch = {"SLURMD_NODENAME": "nid01", "SLURM_JOB_ID": "7", "SLURM_PROCID": "0"}  # no job step
    assert node_name(batch, 0, 1, uname="host-a") == "host-a"
    assert node_name({**srun, "SLURMD_NODENAME": ""}, 1, 3, uname="host-b") == "host-b"
    assert node_name({}, 0, 2, uname="host-a") == "host-a"
    old = {k: v for k, v in srun.items() if k != "SLURM_STEP_ID"} | {"SLURM_STEPID": "4"}
    assert node_name(old, 1, 3, uname="host-b") == "nid01"


def test_slurm_names_are_used_only_if_they_match_the_real_hosts_one_to_one():
    from dragon.transport.world import consistent_names

    assert consistent_names(["a", "a", "b"], ["n1", "n1", "n2"]) == ["n1", "n1", "n2"]
    assert consistent_names(["a", "b"], ["n1", "n1"]) == ["a", "b"]  # one name inherited by two hosts
    assert consistent_names(["a", "a"], ["n1", "a"]) == ["a", "a"]  # one host, two names


def test_which_rank_runs_global_services():
    from dragon.transport.world import gs_rank_of

    two = ["a", "b"]
    assert gs_rank_of(["a", "a", "b"], False, None) == (1, None)  # srun -N 2 -n 3 (block): the extra rank
    assert gs_rank_of(["a", "b", "a"], False, None) == (2, None)  # cyclic
    assert gs_rank_of(["a", "a", "b"], False, False) == (None, None)  # --no-gs-rank
    assert gs_rank_of(["a", "a", "b", "b"], False, None) == (None, None)  # two extra ranks: not automatic
    assert gs_rank_of(["a", "a", "b", "b"], False, True) == (3, None)  # asked: the highest extra rank
    assert gs_rank_of(two, False, None) == (None, None)
    assert gs_rank_of(["a", "a", "a"], True, None) == (None, None)  # virtual nodes: only when asked
    assert gs_rank_of(["a", "a", "a"], True, True) == (2, None)
    assert gs_rank_of(["a", "b", "c"], False, True) == (2, None)  # one rank per host: the last host is GS's
    for virtual in (False, True):
        rank, why = gs_rank_of(["a"], virtual, True)  # no rank to spare
        assert rank is None and "--gs-rank" in why and "srun -N 2 -n 3" in why and "mpiexec -n 3" in why


def test_gs_rank_without_mpi_is_refused(tmp_path):
    (tmp_path / "x.py").write_text("print('RAN')")
    r = _run("--gs-rank", "x.py", cwd=tmp_path)
    assert r.returncode == 2 and "RAN" not in r.stdout, r
    assert "--gs-rank: global services needs a rank of its own" in r.stderr, r.stderr
    r = _run("--help")
    assert "--gs-rank" in r.stdout and "--no-gs-rank" in r.stdout and "srun -N 2 -n 3" in r.stdout


@pytest.mark.timeout(10)
def test_infra_pool_size_from_the_environment():
    from dragon.env import infra_pool_size

    assert infra_pool_size({}) == 64 << 20
    assert infra_pool_size({"DRAGON_INFRA_POOL_SIZE": "128M"}) == 128 << 20
    assert infra_pool_size({"DRAGON_INFRA_POOL_SIZE": "1g"}) == 1 << 30
    assert infra_pool_size({"DRAGON_INFRA_POOL_SIZE": " 4096 "}) == 4096
    for bad in ("x", "0", "-5M", "1.5G", "M"):
        with pytest.raises(ValueError, match="DRAGON_INFRA_POOL_SIZE"):
            infra_pool_size({"DRAGON_INFRA_POOL_SIZE": bad})


@pytest.mark.timeout(60)
def test_under_slurm_the_launcher_removes_segments_of_ended_slurm_jobs(tmp_path):
    """A node where a SIGKILLed job left segments and no epilog runs: the next dragon-launch of a Slurm job
    there removes segments of Slurm jobs no live process belongs to, and keeps its own job's and a mapped
    one's."""
    import mmap

    dead = f"dragon-s{os.getpid()}7_jdead00000-inf"  # an ended Slurm job's (no process has its id)
    mine_id = str(900000000 + os.getpid())
    own = f"dragon-s{mine_id}_jother0000-inf"  # same Slurm job as the launcher: alive
    mapped = f"dragon-s{os.getpid()}8_jmapped0000-inf"  # ended job, but a live process maps it
    paths = [os.path.join("/dev/shm", n) for n in (dead, own, mapped)]
    for p in paths:
        with open(p, "wb") as f:
            f.write(b"\0" * 4096)
    fd = os.open(paths[2], os.O_RDWR)
    mm = mmap.mmap(fd, 4096)
    try:
        r = run_app(tmp_path, "print('ran', flush=True)", env={"SLURM_JOB_ID": mine_id})
        assert r.returncode == 0 and "ran" in r.stdout, r.stderr
        assert not os.path.exists(paths[0]), "the ended job's segment is still there"
        assert os.path.exists(paths[1]) and os.path.exists(paths[2])
        assert "removed 1 segment(s) that ended Slurm jobs left" in r.stderr and dead in r.stderr, r.stderr
    finally:
        mm.close()
        os.close(fd)
        for p in paths:
            try:
                os.unlink(p)
            except OSError:
                pass


@pytest.mark.timeout(10)
def test_mpich_wheel_under_srun_pmi2_uses_the_ofi_netmod_unless_the_user_chose():
    from dragon.transport.world import mpi_netmod_workaround as rule

    wheel = "MPICH Version:      5.0.2\nMPICH Device:       ch4:ucx ofi\n"
    srun = {"PMI_FD": "5", "SLURM_STEP_ID": "0"}
    assert rule(wheel, srun) == "ofi"
    assert rule(wheel, {**srun, "MPIR_CVAR_CH4_NETMOD": "ucx"}) is None  # the user's choice
    assert rule(wheel, {"PMI_FD": "5"}) is None  # mpiexec's PMI, not srun's
    assert rule(wheel, {"SLURM_STEP_ID": "0"}) is None  # srun without PMI-2 wiring
    assert rule("MPICH Version: 4.1\nMPICH Device: ch4:ofi\n", srun) is None
    assert rule("Open MPI v4.1.4", srun) is None
    from dragon.transport.world import srun_netmod  # (the rule alone, which dragon-bench applies under srun)

    assert srun_netmod(wheel) == "ofi" and srun_netmod("Open MPI v4.1.4") is None
