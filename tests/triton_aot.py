"""Ahead-of-time compile checks for Triton kernels, usable on a machine with no GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` lowers a kernel all the way to a
cubin without a driver; Triton's own ``ptxas -v`` log (``knobs.nvidia.dump_ptxas_log``; on a Triton cache
hit, a re-run of the bundled ptxas with Triton's flags) gives the register count, spill bytes and static
shared memory. Triton's own shared memory (``metadata.shared``, allocated dynamically at launch) is added to
the static part. Jobs compile in forked workers, one per CPU core.

Why a subprocess: under ``TRITON_INTERPRET=1`` (set by tests/conftest.py when there is no GPU)
``triton.jit`` returns interpreter objects that ``ASTSource`` cannot compile, so the compile runs in a
fresh Python with ``TRITON_INTERPRET`` removed, importing the kernel by module and name. Without the
interpreter it still runs in a subprocess, so that results never depend on what the test process imported.
Many kernels / configs can be compiled in one subprocess with :func:`compile_reports` (import cost is paid
once).

API::

    compile_report(fn, signature, constexprs, arch, num_warps=4, num_stages=2) -> dict
        keys: registers, spill_stores, spill_loads, shared_bytes (also: arch, name)
    compile_reports(jobs) -> list of dict      # jobs: dicts with the compile_report arguments
    assert_compiles_clean(fn, signature, constexprs, num_warps=4, num_stages=2, archs=(80, 90))
    assert_all_compile_clean(jobs, archs=(80, 90))

``signature`` maps every argument name to a Triton type string ("*fp32", "i32", "fp32", "constexpr", ...);
``constexprs`` maps the constexpr argument names to their values.
"""
import inspect
import os
import pickle
import subprocess
import sys
import tempfile
from typing import Dict, Iterable, List

# Per-block shared memory a kernel may opt in to (CUDA programming guide, compute capabilities table).
SHARED_MEMORY_LIMIT_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _kernel_location(fn):
    """(module name, function name, file) of a @triton.jit function, interpreted or not."""
    py_fn = getattr(fn, "fn", fn)
    return py_fn.__module__, py_fn.__name__, inspect.getfile(py_fn)


def _compile_reports_in_subprocess(jobs: List[dict]) -> List[dict]:
    payload = []
    for job in jobs:
        module, name, path = _kernel_location(job["fn"])
        payload.append({**{k: v for k, v in job.items() if k != "fn"}, "module": module, "name": name, "path": path})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        job_file, result_file = os.path.join(tmp, "jobs.pkl"), os.path.join(tmp, "results.pkl")
        with open(job_file, "wb") as f:
            pickle.dump({"sys_path": sys.path, "jobs": payload}, f)
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), job_file, result_file],
            env=env, capture_output=True, text=True,
        )
        if proc.returncode != 0 or not os.path.exists(result_file):
            raise RuntimeError(f"AOT compile subprocess failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        with open(result_file, "rb") as f:
            return pickle.load(f)


def compile_reports(jobs: Iterable[dict]) -> List[dict]:
    """Compile many (fn, signature, constexprs, arch, num_warps, num_stages) jobs in one subprocess.

    Each result has registers, spill_stores, spill_loads, shared_bytes, arch, name and ``error`` (None, or
    the compiler's message when the compile failed).
    """
    jobs = [{"num_warps": 4, "num_stages": 2, **job} for job in jobs]
    return _compile_reports_in_subprocess(jobs)


def compile_report(fn, signature: Dict[str, str], constexprs: dict, arch: int, num_warps: int = 4,
                   num_stages: int = 2) -> dict:
    """Compile one kernel for sm_<arch>; raises RuntimeError on a compile error."""
    (report,) = compile_reports([dict(fn=fn, signature=signature, constexprs=constexprs, arch=arch,
                                      num_warps=num_warps, num_stages=num_stages)])
    if report["error"]:
        raise RuntimeError(f"{report['name']} failed to compile for sm_{arch}:\n{report['error']}")
    return report


def problems(report: dict) -> List[str]:
    """Human-readable reasons a compile report is not clean (empty when clean)."""
    where = f"{report['name']} sm_{report['arch']} {report.get('config', '')}".strip()
    if report["error"]:
        return [f"{where}: compile error: {report['error'][:3000]}"]
    out = []
    if report["spill_stores"] or report["spill_loads"]:
        out.append(f"{where}: register spills ({report['spill_stores']} B stores, {report['spill_loads']} B loads, "
                   f"{report['registers']} registers)")
    limit = SHARED_MEMORY_LIMIT_BYTES.get(report["arch"])
    if limit is not None and report["shared_bytes"] > limit:
        out.append(f"{where}: shared memory {report['shared_bytes']} B over the sm_{report['arch']} limit {limit} B")
    return out


def assert_all_compile_clean(jobs: Iterable[dict], archs=(80, 90)) -> List[dict]:
    """Compile every job for every arch; fail on any compile error, register spill or shared-memory overflow."""
    expanded = [{**job, "arch": arch} for job in jobs for arch in archs]
    reports = compile_reports(expanded)
    for job, report in zip(expanded, reports):
        report["config"] = {k: v for k, v in job.items() if k in ("constexprs", "num_warps", "num_stages")}
    failures = [p for report in reports for p in problems(report)]
    assert not failures, "\n".join(failures)
    return reports


def assert_compiles_clean(fn, signature: Dict[str, str], constexprs: dict, num_warps: int = 4, num_stages: int = 2,
                          archs=(80, 90)) -> List[dict]:
    return assert_all_compile_clean([dict(fn=fn, signature=signature, constexprs=constexprs, num_warps=num_warps,
                                          num_stages=num_stages)], archs=archs)


# ----------------------------------------------------------------------------------------------- subprocess side

def _load_kernel(module: str, name: str, path: str):
    import importlib
    import importlib.util

    try:
        if module != "__main__":
            return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        pass
    spec = importlib.util.spec_from_file_location(f"_aot_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, name)


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Re-run Triton's ptxas with Triton's own flags (-lineinfo -v --regAllocOptLevel=2) and parse its log."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    return _parse_ptxas_log(log)


def _parse_ptxas_log(log: str) -> dict:
    import re

    def grab(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return {
        "registers": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "static_shared_bytes": grab(r"(\d+) bytes smem"),
        "ptxas_log": log,
    }


def _compile_one(job: dict) -> dict:
    import contextlib
    import io
    import traceback

    import triton
    from triton.backends.compiler import GPUTarget

    report = {"name": job["name"], "arch": job["arch"], "error": None, "registers": 0, "spill_stores": 0,
              "spill_loads": 0, "shared_bytes": 0}
    try:
        fn = _load_kernel(job["module"], job["name"], job["path"])
        src = triton.compiler.ASTSource(fn, job["signature"], job["constexprs"])
        # Triton prints its own ptxas -v log with this knob; a cache hit runs no ptxas, so then we run it again
        triton.knobs.nvidia.dump_ptxas_log = True
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32),
                                    options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})
        log = log.getvalue()
        usage = _parse_ptxas_log(log) if "Used" in log else _ptxas_usage(kernel.asm["ptx"], job["arch"])
        report.update(registers=usage["registers"], spill_stores=usage["spill_stores"],
                      spill_loads=usage["spill_loads"],
                      shared_bytes=kernel.metadata.shared + usage["static_shared_bytes"])
    except Exception as exc:  # noqa: BLE001 - reported back to the caller, who fails the test with it
        root = exc
        while root.__cause__ is not None:
            root = root.__cause__
        # the innermost error says what is wrong; Triton's outer ones only point at the call site
        report["error"] = f"{type(root).__name__}: {root}\n--- traceback tail ---\n{traceback.format_exc()[-1500:]}"
    return report


def _main(job_file: str, result_file: str) -> None:
    with open(job_file, "rb") as f:
        data = pickle.load(f)
    sys.path[:] = data["sys_path"]
    jobs = data["jobs"]
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        # ptxas and Triton's passes are single-threaded: one forked worker per core
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_compile_one, jobs))
    else:
        results = [_compile_one(job) for job in jobs]
    with open(result_file, "wb") as f:
        pickle.dump(results, f)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
