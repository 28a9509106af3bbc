"""cupy_varlen: variable-length (packed) attention kernels, compiled at run time by CuPy's NVRTC.

Public API:
    varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                scale=None, window_size=(-1, -1), return_lse=False, out=None)
    varlen_attn_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, *, causal=False, scale=None, window_size=(-1, -1),
                         deterministic=False, dq=None, dk=None, dv=None) -> (dq, dk, dv)
    reference.varlen_attn_reference(...)  float64 reference with the same arguments
"""

from ._api import varlen_attn, varlen_attn_backward
from . import reference

__version__ = "0.1.0"
__all__ = ["varlen_attn", "varlen_attn_backward", "reference", "__version__"]
