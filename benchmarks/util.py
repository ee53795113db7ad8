"""Small shared pieces of the harness: statistics, the progress bar, environment facts, child-process helpers.

Nothing here imports dragon, so the harness can report cleanly on a machine where a piece of dragon is
missing.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import uuid

SHM = "/dev/shm"
# the channel peers of `dragon-bench channels` ("dragonhpc" is apart: it runs under its own launcher)
CHANNEL_PEERS = [
    "dragon",
    "dragon-batch",
    "dragon-zc",
    "mp-queue",
    "mp-pipe",
    "faster-fifo",
    "ff-batch",
    "mpi4py",
]
JSON_MARK = "DRAGON_BENCH_JSON:"  # a line printed by inner programs, followed by one JSON object


# ----------------------------------------------------------------------------------------------------------
# statistics


def quantile(xs, q):
    """Linear-interpolated quantile of a non-empty sequence (q in [0, 1])."""
    s = sorted(xs)
    if not s:
        raise ValueError("quantile of an empty sequence")
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(samples):
    """Median and spread (min, max, IQR) of the per-repeat samples of one figure."""
    samples = [float(x) for x in samples]
    return {
        "median": quantile(samples, 0.5),
        "min": min(samples),
        "max": max(samples),
        "q1": quantile(samples, 0.25),
        "q3": quantile(samples, 0.75),
        "n": len(samples),
        "samples": samples,
    }


def figure(group, test, peer, metric, unit, better, samples, size=None, **extra):
    """One measured figure: what was measured, for whom, and its median and spread over the repeats."""
    fig = {
        "group": group,
        "test": test,
        "peer": peer,
        "size": size,
        "metric": metric,
        "unit": unit,
        "better": better,
    }
    fig.update(summarize(samples))
    fig.update(extra)
    return fig


def human(x, unit=""):
    """Compact number: 1.23M, 45.6k, 789, 0.0123."""
    if x is None:
        return "-"
    ax = abs(x)
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if ax >= div:
            return f"{x / div:.3g}{suf}{unit}"
    if ax >= 1 or ax == 0:
        return f"{x:.3g}{unit}"
    return f"{x:.3g}{unit}"


def size_label(n):
    if n is None:
        return ""
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10} KiB"
    return f"{n} B"


def parse_size(text):
    t = text.strip().lower().replace(" ", "")
    mult = 1
    for suf, m in (("mib", 1 << 20), ("kib", 1 << 10), ("m", 1 << 20), ("k", 1 << 10), ("b", 1)):
        if t.endswith(suf):
            t, mult = t[: -len(suf)], m
            break
    return int(float(t) * mult)


# ----------------------------------------------------------------------------------------------------------
# progress bar (stderr, no dependency)


class Progress:
    """A one-line progress bar on stderr; on a non-terminal it prints one short line per step instead."""

    def __init__(self, total, enabled=True, stream=None):
        self.total = max(1, total)
        self.done = 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.monotonic()
        self.label = ""

    def add_total(self, n):
        self.total += n

    def step(self, label):
        """Announce the step that starts now."""
        self.label = label
        self._draw(announce=True)

    def advance(self, n=1):
        self.done = min(self.total, self.done + n)
        self._draw()

    def _draw(self, announce=False):
        if not self.enabled:
            return
        width = 28
        frac = self.done / self.total
        fill = int(frac * width)
        bar = "#" * fill + "." * (width - fill)
        el = time.monotonic() - self.t0
        text = f"[{bar}] {self.done:3d}/{self.total:<3d} {el:5.1f}s  {self.label}"
        if self.tty:
            cols = shutil.get_terminal_size((100, 20)).columns
            self.stream.write("\r" + text[: cols - 1].ljust(cols - 1))
        elif announce:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ----------------------------------------------------------------------------------------------------------
# environment


def _version(mod):
    try:
        m = __import__(mod)
        v = getattr(m, "__version__", None)
        if v is None:
            from importlib.metadata import version

            v = version(mod.replace("_", "-"))
        return str(v)
    except Exception:
        return None


DRAGONHPC_DEFAULT = "/opt/dragonhpc-venv"


def dragonhpc_venv():
    """Where DragonHPC's virtualenv is looked for: $DRAGONHPC_VENV, default /opt/dragonhpc-venv."""
    return os.environ.get("DRAGONHPC_VENV") or DRAGONHPC_DEFAULT


def dragonhpc_root():
    """The DragonHPC virtualenv, if installed there (its bin/dragon exists), else None."""
    root = dragonhpc_venv()
    if os.access(os.path.join(root, "bin", "dragon"), os.X_OK):
        return root
    return None


def dragonhpc_version():
    root = dragonhpc_root()
    if not root:
        return None
    try:
        out = subprocess.run(
            [
                os.path.join(root, "bin", "python"),
                "-c",
                "from importlib.metadata import version; print(version('dragonhpc'))",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip() or None
    except Exception:
        return None


# an enclosing job's variables: a program that starts its own runtime or MPI job must not see them
_FOREIGN = ("DRAGON_", "PMI_", "PMIX_", "HYDRA_", "MPIR_", "OMPI_", "PRTE_")


def clean_env():
    """The environment without an enclosing dragon job's contract or MPI launcher's variables (dragon-bench
    may itself run under dragon-launch or mpiexec), for programs that start their own runtime or ranks."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN) or k.startswith("DRAGON_BENCH")}


def beside_python(name):
    """The program ``name`` in the directory of this python (a virtualenv's bin/, where pip puts console
    scripts and the mpich wheel puts mpiexec; not on PATH when the virtualenv is not activated), or None."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.access(path, os.X_OK) and not os.path.isdir(path) else None


def mpiexec_path():
    """The mpiexec the benchmarks start ranks with: the one next to python (the mpich wheel's, which matches
    the mpi4py beside it), else PATH's; None if there is none. Every benchmark needing mpiexec asks here."""
    return beside_python("mpiexec") or shutil.which("mpiexec")


def mpicc_path():
    """mpicc, found as mpiexec is (the mpich wheel puts both next to python), or None."""
    return beside_python("mpicc") or shutil.which("mpicc")


# ----------------------------------------------------------------------------------------------------------
# optional pieces: what a peer or an option needs, whether this machine has it, and what to install

BENCH_EXTRA = 'pip install ".[bench]"'
# need -> (module to import, or None for a program or an installation; what to install)
NEEDS = {
    "numpy": ("numpy", "pip install numpy"),
    "faster-fifo": ("faster_fifo", "pip install faster-fifo"),
    "mpi4py": ("mpi4py", "pip install mpi4py mpich"),
    "mpiexec": (None, "pip install mpich: it puts mpiexec next to python"),
    "mpicc": (None, "pip install mpich: it puts mpicc next to python (it needs a C compiler, cc)"),
    "matplotlib": ("matplotlib", "pip install matplotlib"),
    "DragonHPC": (None, "install DragonHPC in a virtualenv and set DRAGONHPC_VENV to it"),
}
IN_BENCH_EXTRA = {
    "numpy",
    "faster-fifo",
    "mpi4py",
    "mpiexec",
    "mpicc",
    "matplotlib",
}  # what BENCH_EXTRA installs
_MISSING = {}


def _why_missing(need):
    module, _ = NEEDS[need]
    if module is not None:
        try:
            __import__(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                return f"{need} is not installed"
            return f"{need} cannot be imported ({type(e).__name__}: {e})"
        except Exception as e:  # a half-built extension, a broken install
            return f"{need} cannot be imported ({type(e).__name__}: {e})"
        return None
    if need == "mpiexec":
        if mpiexec_path():
            return None
        return f"mpiexec is neither next to python ({os.path.dirname(sys.executable)}) nor on PATH"
    if need == "mpicc":
        if mpicc_path():
            return None
        return f"mpicc is neither next to python ({os.path.dirname(sys.executable)}) nor on PATH"
    if need == "DragonHPC":
        if dragonhpc_root():
            return None
        return f"DragonHPC not found: no {os.path.join(dragonhpc_venv(), 'bin', 'dragon')}"
    raise ValueError(f"unknown need {need!r}")


def missing(*needs):
    """What this machine lacks of ``needs`` (keys of NEEDS), as skip reasons [{"why": ..., "need": ...}]
    (empty: it has them all). The report names each missing need once, with what it kept out and what to
    install."""
    out = []
    for need in needs:
        if need not in _MISSING:
            _MISSING[need] = _why_missing(need)
        if _MISSING[need]:
            out.append({"why": _MISSING[need], "need": need})
    return out


_FLAVOR = {}


def slurm_hosts():
    """True inside a Slurm allocation of 2 nodes or more with srun: the cross-node figures then span hosts."""
    nnodes = int(os.environ.get("SLURM_NNODES", "1") or 1)
    return bool(os.environ.get("SLURM_JOB_ID")) and nnodes >= 2 and shutil.which("srun") is not None


def local_mpiexec(n):
    """mpiexec that starts n ranks on THIS host even inside a Slurm allocation (where MPICH's Hydra would
    otherwise spread them over the allocation's nodes)."""
    exe = mpiexec_path()
    if exe not in _FLAVOR:
        try:
            v = subprocess.run(
                [exe, "--version"], capture_output=True, text=True, timeout=30, env=clean_env()
            ).stdout
        except Exception:
            v = ""
        _FLAVOR[exe] = (
            "hydra" if "HYDRA" in v else "openmpi" if "Open MPI" in v or "OpenRTE" in v else "other"
        )
    flavor = _FLAVOR[exe]
    if flavor == "hydra":
        return [exe, "-launcher", "fork", "-n", str(n)]
    if flavor == "openmpi":
        return [exe, "--host", f"localhost:{n}", "-n", str(n)]
    return [exe, "-n", str(n)]


def environment():
    """Facts a reader needs to interpret the figures."""
    env = {
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {
            "dragon": _version("dragon"),
            "numpy": _version("numpy"),
            "faster_fifo": _version("faster_fifo"),
            "mpi4py": _version("mpi4py"),
            "matplotlib": _version("matplotlib"),
            "msgpack": _version("msgpack"),
            "dragonhpc": dragonhpc_version(),
        },
        "mpiexec": mpiexec_path(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_nnodes": os.environ.get("SLURM_NNODES"),
    }
    # in a child: importing mpi4py.MPI here would initialize MPI in the harness (and wait for the other ranks
    # when dragon-bench itself was started by mpiexec)
    try:
        code = (
            "import mpi4py; mpi4py.rc.initialize = mpi4py.rc.finalize = False; from mpi4py import MPI; "
            "print(MPI.Get_library_version().strip().splitlines()[0])"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=clean_env()
        )
        env["mpi_library"] = out.stdout.strip() or None
    except Exception:
        env["mpi_library"] = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    env["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return env


# ----------------------------------------------------------------------------------------------------------
# child programs: run, collect their JSON line, clean up what they leave


def shm_segments():
    try:
        return set(os.listdir(SHM))
    except FileNotFoundError:
        return set()


def parse_json_line(text):
    """The last JSON_MARK line of a program's output, decoded (None if there is none)."""
    found = None
    for line in text.splitlines():
        i = line.find(JSON_MARK)
        if i >= 0:
            found = line[i + len(JSON_MARK) :].strip()
    return json.loads(found) if found else None


def _procs_with_marker(marker):
    """PIDs of live processes whose environment carries DRAGON_BENCH_RUN=marker (so: started by that run)."""
    key = f"DRAGON_BENCH_RUN={marker}".encode()
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if key in f.read().split(b"\0"):
                    pids.append(int(d))
        except OSError:
            continue
    return pids


def mapped_shm():
    """Names of /dev/shm segments some live process has mapped (so: in use by someone)."""
    used = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/maps") as f:
                for line in f:
                    i = line.find(SHM + "/")
                    if i >= 0:
                        used.add(line[i + len(SHM) + 1 :].strip().split(" ")[0])
        except OSError:
            continue
    return used


def run_marked(cmd, timeout, env=None, cwd=None, shm_filter=None):
    """Run ``cmd`` in its own process group with a unique marker in its environment, and clean up after it.

    Returns a dict: rc, stdout, stderr, wall (s), timed_out, leaked_procs (pids we had to kill: processes that
    carry this run's marker and were still alive after it ended), leaked_shm (segments removed: they appeared
    during the run, match ``shm_filter``, and no live process has them mapped any more).  Without a filter no
    segment is touched: other programs on the machine create and remove segments at the same time.
    """
    marker = uuid.uuid4().hex
    full_env = dict(os.environ if env is None else env)
    full_env["DRAGON_BENCH_RUN"] = marker
    before = shm_segments()
    t0 = time.perf_counter()
    # its own process group (not its own session: DragonHPC's launcher hangs without a session leader above
    # it)
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, cwd=cwd, text=True, **group
    )
    timed_out = False
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        out, err = p.communicate()
    wall = time.perf_counter() - t0
    leaked_procs = []
    deadline = time.monotonic() + 3.0
    pids = _procs_with_marker(marker)
    while pids and time.monotonic() < deadline:  # give a runtime's own teardown a moment
        time.sleep(0.1)
        pids = _procs_with_marker(marker)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            leaked_procs.append(pid)
        except OSError:
            pass
    leaked_shm = []
    new = shm_segments() - before
    new = {n for n in new if shm_filter(n)} if shm_filter is not None else set()
    if new:
        time.sleep(0.2)  # a moment for the run's own teardown
        new = (new & shm_segments()) - mapped_shm()
    for name in sorted(new):
        try:
            os.unlink(os.path.join(SHM, name))
            leaked_shm.append(name)
        except OSError:
            pass
    return {
        "rc": p.returncode,
        "stdout": out,
        "stderr": err,
        "wall": wall,
        "timed_out": timed_out,
        "leaked_procs": leaked_procs,
        "leaked_shm": leaked_shm,
    }


def tail(text, n=6):
    lines = [x for x in (text or "").strip().splitlines() if x.strip()]
    return " | ".join(lines[-n:])
