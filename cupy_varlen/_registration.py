"""cupy_varlen's entry in torch's flash-attention registry (torch 2.11 and later).

Registering only records a name and a callable in torch; nothing runs on the GPU and no aten op
changes until the user calls ``torch.nn.attention.activate_flash_attention_impl("cupy_varlen")``.
This module never imports torch: ``import cupy_varlen`` registers only when torch is already in
``sys.modules`` (CuPy-only users keep a torch-free import), and the torch-facing modules
(``compat``, ``_torch``) register again when they load, for users who imported us first.
"""

from __future__ import annotations

import sys

IMPL_NAME = "cupy_varlen"


def register_if_torch_loaded() -> bool:
    """Registers the implementation where torch is imported and has the registry; returns
    whether it did. Idempotent: torch's registry is a dict keyed by name."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        # Usually imported along with torch; a torch old enough to lack it has no registry.
        from torch.nn.attention import register_flash_attention_impl
    except Exception:  # a torch too old, or one still initializing
        return False
    register_flash_attention_impl(IMPL_NAME, register_fn=_activate)
    return True


def _activate():
    """The register_fn torch calls on activation: installs the overrides, returns their handle."""
    from . import _provider

    return _provider.install()
