"""CPython's own multiprocessing suite on the 'dragon' start method (tests/mp_conformance.py runs it; the
tests dragon cannot pass by design are skipped there, with their reasons, in SKIP_DRAGON). The bar: every test
that passes with 'spawn' on this machine passes with 'dragon', except those. Both runs are made here and
compared."""

import json
import os
import subprocess
import sys

import pytest
from test_runtime_util import launch_cmd, launch_env

SCRIPT = os.path.join(os.path.dirname(__file__), "mp_conformance.py")


def _result(r):
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise AssertionError(f"no result:\nstdout:\n{r.stdout[-5000:]}\nstderr:\n{r.stderr[-20000:]}")


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_cpython_multiprocessing_suite_passes_on_dragon_as_on_spawn(tmp_path):
    # the suite's children import it as their main module: preloaded in the zygote, as the suite itself asks
    # forkserver to preload it (set_forkserver_preload)
    env = launch_env({"DRAGON_ZYGOTE_PRELOAD": "test._test_multiprocessing"})
    d = subprocess.run(
        launch_cmd(SCRIPT, "dragon", "--timeout", "60"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    dragon = _result(d)
    print("dragon:", {k: v for k, v in dragon.items() if k != "passed_ids"})
    assert dragon["failed"] == 0 and dragon["errors"] == 0, d.stdout[-5000:] + d.stderr[-30000:]
    assert d.returncode == 0, d.stderr[-5000:]
    s = subprocess.run(
        [sys.executable, SCRIPT, "spawn", "--timeout", "60"],
        cwd=tmp_path,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    spawn = _result(s)
    print("spawn:", {k: v for k, v in spawn.items() if k != "passed_ids"})
    sys.path.insert(0, os.path.dirname(SCRIPT))
    skipped = {"__main__." + k for k in __import__("mp_conformance").SKIP_DRAGON}
    assert set(spawn["passed_ids"]) - set(dragon["passed_ids"]) <= skipped
