"""cupy_varlen: variable-length (packed) attention kernels, compiled at run time by CuPy's NVRTC.

Public API:
    varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                scale=None, window_size=(-1, -1), return_lse=False, out=None)
    varlen_attn_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, *, causal=False, scale=None, window_size=(-1, -1),
                         deterministic=False, dq=None, dk=None, dv=None) -> (dq, dk, dv)
    compat.varlen_attn(...)               torch.nn.attention.varlen's signature
    reference.varlen_attn_reference(...)  float64 reference with the same arguments
    distributed.varlen_attn_cp(...)       context parallelism on torch.distributed

``import cupy_varlen`` does not import torch, so CuPy-only use never pays for it: torch comes in
with the first torch tensor a call receives, or with ``compat``, ``reference`` and ``distributed``
(attributes that import their module on first access).

With torch 2.11 or later, cupy_varlen is also a flash-attention implementation for torch's
dispatcher: ``torch.nn.attention.activate_flash_attention_impl("cupy_varlen")`` puts every caller
of the aten flash ops (``F.scaled_dot_product_attention`` on the flash backend, ``varlen_attn``,
compiled models) on these kernels; ``restore_flash_attention_impl()`` undoes it. The name is
registered when cupy_varlen is imported after torch, or by ``import cupy_varlen.compat``.
"""

from ._api import varlen_attn, varlen_attn_backward
from ._registration import register_if_torch_loaded as _register_if_torch_loaded

__version__ = "0.1.0"
__all__ = ["varlen_attn", "varlen_attn_backward", "reference", "__version__"]

_LAZY_SUBMODULES = ("compat", "reference", "distributed")  # all import torch

# torch's flash-attention registry learns the name "cupy_varlen" (never activated here). Only
# when torch is already imported: this import must not bring torch in.
_register_if_torch_loaded()


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib

        # Importing a submodule binds it on the package, so this runs once per name.
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
