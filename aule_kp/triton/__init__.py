"""Triton backend: FlashAttention-2 kernels for torch tensors on CUDA/ROCm devices."""

from .backend import TritonBackend

__all__ = ["TritonBackend"]
