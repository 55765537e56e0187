"""Test set-up shared by every test file.

Without a CUDA GPU the Triton kernels run in Triton's interpreter on CPU tensors; the variable must be
set before triton is first imported, which is why it lives here at the top of conftest.
"""
import os
import shutil
import subprocess


def _has_cuda() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (this run has none)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=("blas", "onednn"))
def gemm_backend(request):
    """Runs the test once per GEMM library the C++ CPU ops can use (the process-wide choice restored after);
    skips without the extension or without that library."""
    from gcvit_kernels import cpu

    assert request.param in cpu.GEMM_BACKENDS
    ext = cpu.load()
    if ext is None:
        pytest.skip(f"C++ CPU extension unavailable: {cpu.load_error()}")
    if request.param == "onednn" and not ext.has_onednn():
        pytest.skip("this torch has no oneDNN matmul (at::native::mkldnn_matmul)")
    old = cpu.gemm_backend()
    cpu.set_gemm_backend(request.param)
    try:
        yield request.param
    finally:
        cpu.set_gemm_backend(old)
