"""dragon-launch itself: --help, bad command lines, exit codes, programs that are not Python, the example."""

import os
import subprocess

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
    r = _run("--grace", "-1", "x.py")
    assert r.returncode == 2 and "grace" in r.stderr
    r = _run("--bogus", "x.py")
    assert r.returncode == 2 and "--bogus" in r.stderr
    r = _run("-m")
    assert r.returncode == 2 and "module" in r.stderr
    r = _run("/nonexistent/program")  # not a .py: started as an executable, which cannot start
    assert r.returncode == 70 and "/nonexistent/program" in r.stderr


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
        P.create(sys.executable, None, ["-c", "import time; print('early'); time.sleep(30)"], user_name="streamer")
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
