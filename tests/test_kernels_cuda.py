"""The CUDA C++ LayerNorm: its kernel source compiles with nvcc; without a GPU it refuses cleanly."""
import subprocess

import pytest

from megagpt_kernels.cuda import layer_norm as cuda_ln


def test_cuda_kernels_compile_with_nvcc(tmp_path):
    if cuda_ln.find_nvcc() is None:
        pytest.skip("nvcc not found: cannot check that the CUDA LayerNorm compiles")
    obj = tmp_path / "layer_norm_kernels.o"
    # the kernels alone (no torch headers) to an object file: CPU-only CI proves the source builds
    res = subprocess.run([cuda_ln.find_nvcc(), "-c", "-O3", "-std=c++17", "-arch=sm_80", str(cuda_ln.CU_SOURCE),
                          "-o", str(obj)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"nvcc failed on {cuda_ln.CU_SOURCE}:\n{res.stderr}"
    assert obj.stat().st_size > 10_000
    # Every kernel is instantiated for float, half and bfloat16.
    syms = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True).stdout if _have("nm") else ""
    if syms:
        for t in ("float", "__half", "__nv_bfloat16"):
            assert f"ln_fwd<{t}>" in syms and f"ln_bwd_dx<{t}>" in syms, t


def _have(tool):
    import shutil
    return shutil.which(tool) is not None


def test_load_without_gpu_raises_clear_error():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the extension would really be built")
    with pytest.raises(cuda_ln.CudaKernelUnavailable, match="no CUDA device"):
        cuda_ln.load()
