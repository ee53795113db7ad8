"""The checks DESIGN promises ("Tooling"), run with the suite so that CI fails on them: ruff (rules and
format, configured in pyproject.toml), cython-lint on the Cython sources of dragon._core, mypy on the files
pyproject.toml names, and stubtest (the .pyi stub of the compiled module against the module itself).

Each tool runs as ``python -m <tool>`` from the repository root with this interpreter. The tools come with
the ``test`` extra; a missing one fails the test under CI or the README's test command (as a missing Slurm
cluster does, see ``slurm_util.slurm_required``) and skips it elsewhere, with the reason."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_util import slurm_required

REPO = Path(__file__).resolve().parent.parent
CORE = REPO / "dragon" / "_core"


def _run(module, *args, timeout, cwd=REPO, env=None):
    """Run ``python -m module args`` and fail with its output unless it exits 0."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        why = f"{module} is not installed: pip install -e '.[test]' brings ruff, cython-lint and mypy"
        if slurm_required():
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    cmd = [sys.executable, "-m", module, *map(str, args)]
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        pytest.fail(f"{' '.join(cmd[2:])} exited {res.returncode}:\n{res.stdout}{res.stderr}", pytrace=False)


@pytest.mark.timeout(120)
def test_ruff_check():
    _run("ruff", "check", "--no-cache", ".", timeout=100)


@pytest.mark.timeout(120)
def test_ruff_format():
    _run("ruff", "format", "--check", "--no-cache", ".", timeout=100)


@pytest.mark.timeout(120)
def test_cython_lint():
    files = sorted(p for ext in ("pyx", "pxd", "pxi") for p in CORE.glob(f"*.{ext}"))
    assert files, f"no Cython sources in {CORE}"
    _run("cython_lint.cython_lint", *files, timeout=100)


@pytest.mark.timeout(300)
def test_mypy():
    _run("mypy", timeout=280)


@pytest.mark.timeout(300)
def test_stub_matches_compiled_module(tmp_path):
    """core.pyi against dragon._core.core (the allowlist says why each remaining difference is meant):
    both from the tree the rest of the suite imports dragon from (an editable install's finder hides it from
    mypy, so it is named on MYPYPATH and PYTHONPATH), run outside the repository."""
    tree = str(Path(importlib.util.find_spec("dragon").origin).parent.parent)
    env = {
        **os.environ,
        "MYPYPATH": tree,
        "PYTHONPATH": os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")]),
    }
    _run(
        "mypy.stubtest",
        "dragon._core.core",
        "--mypy-config-file",
        REPO / "pyproject.toml",
        "--allowlist",
        REPO / "tests" / "stubtest-allowlist.txt",
        timeout=280,
        cwd=tmp_path,
        env=env,
    )
