"""How every benchmark measures: peak memory over a process tree, and commands run as measured children.

    with TreeMemorySampler() as memory:                  # this process and its children, while the block runs
        work()
    memory.peak_rss_bytes, memory.peak_anonymous_bytes

    measured = run_measured(python_module("pretrain.benchmarks.baselines", "tokenizer", ...),
                            datasets_cache=work / "cache").check("the original tokenizer training")
    measured.seconds, measured.peak_rss_bytes, measured.datasets_cache_bytes, measured.json_lines()
    run_measured(command, timeout_seconds=60).timed_out   # killed, with its children, after 60 s

Peak memory is the resident memory summed over a process and all its descendants at the same moment, sampled
every 20 ms: what a parent and the children it starts hold together is what the machine has to give. The
anonymous part (heap and stacks: RSS less the pages of mapped files such as Arrow caches, which the kernel can
drop and read again) is summed likewise where the platform reports it. GPU memory is torch's own counter
(pretrain.training.telemetry.device_memory_gib), not sampled here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLE_SECONDS = 0.02
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
MIB = 2 ** 20


class TreeMemorySampler:
    """The peak RSS (and anonymous RSS) summed over process `pid` (default: this one) and its descendants.

    Samples in a thread from entering the block until leaving it, or until the process is gone."""

    def __init__(self, pid: int | None = None, every_seconds: float = SAMPLE_SECONDS):
        self.pid, self.every = pid or os.getpid(), every_seconds
        self.peak_rss_bytes, self.peak_anonymous_bytes = 0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False

    def _sample_until_stopped(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:  # the root has ended
                return
            self._add_sample(tree)
            self._stop.wait(self.every)

    def _add_sample(self, tree) -> None:
        import psutil

        rss = anonymous = 0
        has_anonymous = True
        for member in tree:
            try:
                info = member.memory_info()
            except psutil.Error:  # ended between listing and reading: its memory is gone
                continue
            rss += info.rss
            # Linux's `shared` is the resident pages of files and shared memory (RssFile + RssShmem); other
            # platforms do not split RSS that way.
            shared = getattr(info, "shared", None)
            has_anonymous = has_anonymous and shared is not None
            anonymous += info.rss - (shared or 0)
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
        if has_anonymous:
            self.peak_anonymous_bytes = max(self.peak_anonymous_bytes or 0, anonymous)


@dataclass
class Measured:
    """One command run to completion: what it printed and what it cost."""
    command: list[str]
    returncode: int
    seconds: float                      # wall time, from start to exit: interpreter start and imports included
    peak_rss_bytes: int
    peak_anonymous_bytes: int | None    # None where the platform does not report it
    stdout: str
    stderr: str
    datasets_cache_bytes: int | None    # disk left in its own datasets cache; None when it was given none
    timed_out: bool = False             # killed at its time limit: the output is what it printed until then
    cpu_seconds: float | None = None    # user + system time of it and the children it waited for, every thread

    def check(self, what: str) -> "Measured":
        if self.timed_out:
            raise RuntimeError(f"{what} was stopped at its time limit after {self.seconds:.0f} s: "
                               f"{' '.join(self.command)}")
        if self.returncode != 0:
            raise RuntimeError(f"{what} failed (exit status {self.returncode}): {' '.join(self.command)}\n"
                               f"{self.stderr[-3000:]}")
        return self

    def json_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]



def run_measured(command: list[str], *, env: dict | None = None, cwd: Path = REPO,
                 datasets_cache: Path | None = None, timeout_seconds: float | None = None) -> Measured:
    """Run `command` to its end, offline, with the suite importable (PYTHONPATH); its time, memory and output.

    `datasets_cache`: a folder made empty for this run alone and set as its HF_DATASETS_CACHE; the bytes left in
    it afterwards are reported, then it is removed. `timeout_seconds`: past it, the command and every process it
    started are killed, and the result says `timed_out`.
    """
    full_env = child_env(env)
    if datasets_cache is not None:
        shutil.rmtree(datasets_cache, ignore_errors=True)
        datasets_cache.mkdir(parents=True)
        full_env["HF_DATASETS_CACHE"] = str(datasets_cache)
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        started = time.perf_counter()
        # A session of its own, so that a timeout reaches every process it started (compile workers included).
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=full_env, cwd=cwd, text=True,
                                   start_new_session=timeout_seconds is not None)
        with TreeMemorySampler(process.pid) as memory:
            # wait4 gives this child's own rusage; RUSAGE_CHILDREN would mix in every earlier child's peak.
            if timeout_seconds is None:
                _, status, usage = os.wait4(process.pid, 0)
                timed_out = False
            else:
                status, usage, timed_out = _wait_or_kill(process.pid, started + timeout_seconds)
            seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        output, errors = stdout.read(), stderr.read()
    cache_bytes = None
    if datasets_cache is not None:
        cache_bytes = disk_bytes(datasets_cache)
        shutil.rmtree(datasets_cache, ignore_errors=True)
    # The kernel's max RSS (of the child, or of the largest descendant it waited for) catches a peak shorter than
    # the sampling interval.
    kernel_peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return Measured(command, process.returncode, seconds, max(memory.peak_rss_bytes, kernel_peak),
                    memory.peak_anonymous_bytes, output, errors, cache_bytes, timed_out,
                    usage.ru_utime + usage.ru_stime)


def _wait_or_kill(pid: int, deadline: float):
    """Wait for child `pid` until `deadline` (perf_counter), then kill it and its descendants: (status, rusage,
    timed_out). It is polled rather than waited for, so it is killed only while unreaped and its pid still its own."""
    import psutil

    timed_out = False
    while True:
        reaped, status, usage = os.wait4(pid, os.WNOHANG)
        if reaped:
            return status, usage, timed_out
        if not timed_out and time.perf_counter() >= deadline:
            timed_out = True
            try:
                root = psutil.Process(pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                tree = []
            for member in tree:
                try:
                    member.kill()
                except psutil.Error:
                    pass
            try:
                os.killpg(pid, signal.SIGKILL)  # any left in its session that were not listed in time
            except OSError:
                pass
        time.sleep(0.01)


def peak_memory_mib(runs: list[Measured]) -> dict:
    """The largest peaks over runs of one variant, in MiB (anonymous: None where the platform does not report it)."""
    anonymous = [run.peak_anonymous_bytes for run in runs if run.peak_anonymous_bytes is not None]
    return {"peak_rss_mib": round(max(run.peak_rss_bytes for run in runs) / MIB, 1),
            "peak_anonymous_mib": round(max(anonymous) / MIB, 1) if anonymous else None}


def child_env(extra: dict | None = None) -> dict:
    """The environment of a measured child: offline, and able to import the suite's package."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, **OFFLINE_ENV, "PYTHONPATH": path, **(extra or {})}


def python_module(module: str, *args) -> list[str]:
    """The command that runs `module` of the suite as a program with this interpreter."""
    return [sys.executable, "-m", module, *map(str, args)]


def disk_bytes(path: Path) -> int:
    """Bytes allocated on disk under `path` (0 when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return 0
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file() and not p.is_symlink())
