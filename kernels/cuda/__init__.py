"""Hand-written CUDA kernels (JIT-built via torch.utils.cpp_extension); see layer_norm.py."""
