"""Triton kernels used by the engine on CUDA devices (optional: imported only where Triton is available)."""
