"""Triton kernels for mono_quant's statistics, installed as ``mono_quant.kernels``.

Imports torch and triton, never mono_quant. Until the kernels land, importing this package raises
ImportError, which ``mono_quant.ops`` reports as "the Triton backend is not available".
"""

raise ImportError("mono_quant.kernels: the Triton kernels are not implemented yet")
