"""Benchmark session plumbing: a session-scoped results collector and the JSON it writes at session end.

Every test of ``benchmarks/test_bench_model.py`` hands its record (images/s, latency percentiles, peak memory,
speed-up against the reference eager model of its group measured in the same test, whether the fused path
really ran, or why it was skipped) to the ``bench_collector`` fixture. At the end of the session the collector
writes ONE JSON for the run, ``benchmarks/results/<device>-<YYYY-MM-DD>[-<tag>].json`` (``-2``, ``-3``, ... if
that name is taken), with the device, versions, git commit and the settings. It writes only when at least one
benchmark really ran (nothing in ``--benchmark-disable`` smoke runs); the file is rewritten after every case
(``"complete": false``) so an interrupted run keeps what it measured, and a last time at session end.

Output path: ``--gcvit-bench-out PATH`` or ``$GCVIT_BENCH_OUT`` (a ``.json`` file, or a directory to write
the default name into).
"""
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
SCHEMA = 1

def pytest_addoption(parser):
    group = parser.getgroup("gcvit-bench", "gcvit model benchmarks")
    group.addoption("--gcvit-bench-out", default=None,
                    help="where to write the run's results JSON (a .json file or a directory); "
                         "default $GCVIT_BENCH_OUT or benchmarks/results/<device>-<date>.json")


def _run(cmd: List[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info() -> Dict[str, Any]:
    commit = _run(["git", "rev-parse", "HEAD"])
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return {"commit": commit, "dirty": bool(status) if status is not None else None,
            "dirty_files": status.splitlines() if status else [],
            "branch": _run(["git", "rev-parse", "--abbrev-ref", "HEAD"])}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(text: str) -> str:
    keep = "".join(c.lower() if c.isalnum() else "-" for c in text)
    while "--" in keep:
        keep = keep.replace("--", "-")
    return keep.strip("-")


def device_info(device_type: str) -> Dict[str, Any]:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"type": device_type, "cpu": _cpu_model(), "cpu_cores": cores, "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if device_type == "cuda":
        gpu = torch.cuda.get_device_name()
        info.update(name=_slug(gpu), gpu=gpu, cuda=torch.version.cuda,
                    capability=".".join(map(str, torch.cuda.get_device_capability())),
                    driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    else:
        info["name"] = f"cpu-{cores}core"
    return info


def versions() -> Dict[str, Optional[str]]:
    out = {"python": platform.python_version()}
    for mod in ("torch", "triton", "timm", "numpy", "onnx", "onnxruntime", "onnxscript", "gcvit"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed or broken: say so instead of failing the run
            out[mod] = None
    return out


class BenchCollector:
    """Collects one record per benchmark test, plus a per-group cache (the group's reference eager runner)."""

    def __init__(self, config):
        self.config = config
        self.records: List[Dict[str, Any]] = []
        self.settings: Dict[str, Any] = {}
        self.device_type: Optional[str] = None
        self.started = time.time()
        self.started_utc = datetime.datetime.now(datetime.timezone.utc)
        self.load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
        self._cache_key = None
        self._cache_value = None
        self.written: Optional[str] = None

    def add(self, record: Dict[str, Any]) -> None:
        self.records.append(record)
        if self.measured:  # keep the file current, so an interrupted run still leaves its numbers ("complete": false)
            self.write(None)

    def group_cached(self, key, build: Callable[[], Any]) -> Any:
        """The cached value for ``key`` (built on first use); holds one group at a time to bound memory."""
        if self._cache_key != key:
            self._cache_key, self._cache_value = None, None  # free the previous group's models first
            self._cache_value = build()
            self._cache_key = key
        return self._cache_value

    def release(self) -> None:
        self._cache_key, self._cache_value = None, None

    @property
    def measured(self) -> bool:
        return any(r.get("measured") for r in self.records)

    def output_path(self) -> str:
        if self.written:  # one file per run, chosen at the first write
            return self.written
        target = self.config.getoption("gcvit_bench_out", default=None) or os.environ.get("GCVIT_BENCH_OUT")
        tag = self.settings.get("tag")
        name = f"{device_info(self.device_type or 'cpu')['name']}-{self.started_utc:%Y-%m-%d}"
        if tag:
            name += f"-{tag}"
        if target and target.endswith(".json"):
            return target
        directory = target or RESULTS_DIR
        path = os.path.join(directory, name + ".json")
        n = 2
        while os.path.exists(path):
            path = os.path.join(directory, f"{name}-{n}.json")
            n += 1
        return path

    def document(self, exitstatus) -> Dict[str, Any]:
        finished = datetime.datetime.now(datetime.timezone.utc)
        return {
            "schema": SCHEMA,
            "date": f"{self.started_utc:%Y-%m-%d}",
            "started_utc": self.started_utc.isoformat(timespec="seconds"),
            "finished_utc": finished.isoformat(timespec="seconds"),
            "wall_s": round(time.time() - self.started, 1),
            "complete": exitstatus is not None,
            "exit_status": None if exitstatus is None else int(exitstatus),
            "command": " ".join(sys.argv),
            "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("GCVIT_", "OMP_", "MKL_"))},
            "load_average_start": self.load_start,
            "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "device": device_info(self.device_type or "cpu"),
            "versions": versions(),
            "git": git_info(),
            "settings": self.settings,
            "summary": self.summary(),
            "results": self.records,
        }

    def summary(self) -> Dict[str, Dict[str, Any]]:
        """{group: {mode: speed-up vs the group's reference eager (interleaved, this run), or the skip reason}}."""
        out: Dict[str, Dict[str, Any]] = {}
        for r in self.records:
            value = r.get("speedup_vs_reference") if r.get("status") == "ok" else f"{r.get('status')}: {r.get('reason')}"
            out.setdefault(r["group"], {})[r["mode"]] = round(value, 3) if isinstance(value, float) else value
        return out

    def write(self, exitstatus) -> Optional[str]:
        """Write the run's JSON; ``exitstatus`` None marks a partial write during the session."""
        path = self.output_path()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.document(exitstatus), f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
        self.written = path
        return path


_KEY = pytest.StashKey[BenchCollector]() if hasattr(pytest, "StashKey") else None


def pytest_configure(config):
    config.stash[_KEY] = BenchCollector(config)


@pytest.fixture(scope="session")
def bench_collector(pytestconfig) -> BenchCollector:
    return pytestconfig.stash[_KEY]


def pytest_sessionfinish(session, exitstatus):
    collector = session.config.stash.get(_KEY, None)
    if collector is None:
        return
    collector.release()
    if collector.measured:
        path = collector.write(exitstatus)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"gcvit benchmark results: {path}")
