"""cupy_varlen: variable-length (packed) attention kernels, compiled at run time by CuPy's NVRTC.

Public API:
    varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                scale=None, window_size=(-1, -1), return_lse=False, out=None)
    varlen_attn_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, *, causal=False, scale=None, window_size=(-1, -1),
                         deterministic=False, dq=None, dk=None, dv=None) -> (dq, dk, dv)
    compat.varlen_attn(...)               torch.nn.attention.varlen's signature
    reference.varlen_attn_reference(...)  float64 reference with the same arguments

``import cupy_varlen`` does not import torch, so CuPy-only use never pays for it: torch comes in
with the first torch tensor a call receives, or with ``compat`` and ``reference`` (attributes that
import their module on first access).
"""

from ._api import varlen_attn, varlen_attn_backward

__version__ = "0.1.0"
__all__ = ["varlen_attn", "varlen_attn_backward", "reference", "__version__"]

_LAZY_SUBMODULES = ("compat", "reference")  # both import torch


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib

        # Importing a submodule binds it on the package, so this runs once per name.
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
