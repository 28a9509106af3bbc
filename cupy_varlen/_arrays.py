"""The torch / CuPy bridge: what an array is, where it lives, how to allocate beside it.

Kernels take raw device pointers, so neither framework's array has to be converted to run one: a
torch tensor is read through ``data_ptr()`` and ``stride()``, a CuPy array through ``data.ptr`` and
``strides``, zero-copy either way. Outputs are allocated by the caller's framework (torch's caching
allocator, so CUDA graphs and memory accounting work) and kernels go on its current stream. Any
other object with ``__dlpack__`` is taken in through ``cupy.from_dlpack`` (zero-copy) and answered
with CuPy arrays.

torch is never imported here: CuPy-only users must not pay for it (seconds of import time). Until
something else has imported torch no object can be a torch tensor, so :func:`framework_of` needs
no torch to answer; the torch side (:class:`TorchFramework`) is built the first time a tensor
shows up.
"""

from __future__ import annotations

import sys

import cupy

DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16"}


class ArrayInfo:
    """What the kernels need to know about one array. (A plain slotted class: it is built several
    times per call, and a frozen dataclass costs microseconds each.)"""

    __slots__ = ("shape", "strides", "dtype", "device", "ptr")

    def __init__(self, shape, strides, dtype, device, ptr):
        self.shape = shape  # tuple
        self.strides = strides  # in elements
        self.dtype = dtype  # framework-neutral name: "bfloat16", "float16", "int32", "float32"
        self.device = device  # CUDA ordinal, or -1 for host memory
        self.ptr = ptr


class Framework:
    """Operations on one array type; the subclasses are the only framework-specific code."""

    name = ""

    def info(self, x) -> ArrayInfo:
        raise NotImplementedError

    def ptr(self, x) -> int:
        raise NotImplementedError

    def signature(self, arrays):
        """(layouts, pointers) of ``arrays``, or None unless every one is exactly of this
        framework's array type (None entries allowed: layout None, pointer 0). A layout is shape,
        strides, dtype and device as a hashable tuple: a launch plan's key (cupy_varlen._api) is
        made of them. Runs on every call, hence one loop per framework with no calls inside."""
        raise NotImplementedError

    def empty(self, shape, like, dtype=None):
        """Uninitialized array on ``like``'s device, of ``like``'s dtype unless ``dtype`` ("float32",
        "int32") is given."""
        raise NotImplementedError

    def stream_ptr(self, device: int) -> int:
        raise NotImplementedError

    def copy(self, x):
        """A fresh, contiguous (hence 16-byte aligned) copy."""
        raise NotImplementedError

    def copy_into(self, dst, src) -> None:
        raise NotImplementedError

    def zero_(self, x) -> None:
        """Fills ``x`` with zeros, on its framework's current stream."""
        raise NotImplementedError

    def offsets_summary(self, cu) -> tuple:
        """(first, last, smallest step, largest step) of a 1-D offsets array, reduced on its device
        and read back in one transfer (this synchronizes: check_inputs=True only)."""
        raise NotImplementedError

    def used_summary(self, used, cu) -> tuple:
        """(smallest count, largest count minus its slot) of seqused_k ``used`` against the slots
        of the offsets ``cu`` (one longer), reduced on the device and read back in one transfer
        (check_inputs=True only). A batch of no sequences gives (0, 0)."""
        raise NotImplementedError

    def paged_summary(self, used, cu, table, page_size) -> tuple:
        """(first offset, smallest offset step, smallest count, largest count, smallest page,
        largest page) of a paged cache, in one transfer (check_inputs=True only). The counts are
        seqused_k ``used``, the steps of the offsets ``cu``, or the smaller of the two where both
        are given (either may be None); the pages are the entries of block table ``table`` that
        the counts reach (ceil(count / page_size) per row). No offsets, sequence or page reached
        reads as 0 there."""
        raise NotImplementedError

    @staticmethod
    def _paged_summary(xp, used, cu, table, page_size, stack, rows):
        steps = None if cu is None else cu[1:] - cu[:-1]
        counts = steps if used is None else used if steps is None else xp.minimum(used, steps)
        zero = xp.zeros(1, dtype=table.dtype)
        if rows(counts) == 0:
            return (0,) * 6
        pages = (xp.maximum(counts, 0) + page_size - 1) // page_size
        reached = xp.arange(table.shape[1])[None, :] < pages[:, None]
        entries = table[reached]
        if rows(entries) == 0:
            entries = zero
        first = zero[0] if cu is None else cu[0]
        min_step = zero[0] if steps is None else steps.min()
        return stack([first, min_step, counts.min(), counts.max(), entries.min(),
                      entries.max()])


class TorchFramework(Framework):
    name = "torch"

    def __init__(self, torch):
        self._torch = torch
        self._dtypes = {
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
            "float32": torch.float32,
            "int32": torch.int32,
        }
        self._names = {v: k for k, v in self._dtypes.items()}
        # The raw cudaStream_t straight from torch's C API (what Triton's launcher reads): building
        # a torch.cuda.Stream object per call costs several microseconds.
        self._raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)

    def info(self, x) -> ArrayInfo:
        return self.meta(x, x.data_ptr())

    def meta(self, x, ptr=None) -> ArrayInfo:
        """info() without reading the data pointer, which fake tensors (torch.compile tracing)
        do not have: enough for every check but the launch itself."""
        dtype = self._names.get(x.dtype)
        return ArrayInfo(
            tuple(x.shape),
            x.stride(),
            dtype if dtype is not None else str(x.dtype).replace("torch.", ""),
            x.get_device() if x.is_cuda else -1,
            ptr,
        )

    def ptr(self, x) -> int:
        return x.data_ptr()

    def signature(self, arrays):
        layouts, ptrs = [], []
        tensor = _TENSOR
        for x in arrays:
            if x is None:
                layouts.append(None)
                ptrs.append(0)
            elif type(x) is tensor:
                layouts.append((x.shape, x.stride(), x.dtype, x.get_device()))
                ptrs.append(x.data_ptr())
            else:
                return None
        return tuple(layouts), ptrs

    def empty(self, shape, like, dtype=None):
        # new_empty: about 1 us less per call than torch.empty(..., device=like.device).
        return like.new_empty(shape) if dtype is None else like.new_empty(
            shape, dtype=self._dtypes[dtype])

    def stream_ptr(self, device):
        if self._raw_stream is not None:
            return self._raw_stream(device)
        return self._torch.cuda.current_stream(device).cuda_stream

    def copy(self, x):
        return x.clone(memory_format=self._torch.contiguous_format)

    def copy_into(self, dst, src):
        dst.copy_(src)

    def zero_(self, x):
        x.zero_()

    def offsets_summary(self, cu):
        torch = self._torch
        steps = cu[1:] - cu[:-1]
        if steps.numel() == 0:
            steps = torch.zeros(1, dtype=cu.dtype, device=cu.device)
        return tuple(torch.stack([cu[0], cu[-1], steps.min(), steps.max()]).tolist())

    def used_summary(self, used, cu):
        if used.numel() == 0:
            return 0, 0
        excess = used - (cu[1:] - cu[:-1])
        return tuple(self._torch.stack([used.min(), excess.max()]).tolist())

    def paged_summary(self, used, cu, table, page_size):
        torch = self._torch

        class _On:  # torch's spelling of the array functions, on the table's device
            zeros = staticmethod(lambda n, dtype: torch.zeros(n, dtype=dtype, device=table.device))
            arange = staticmethod(lambda n: torch.arange(n, device=table.device))
            minimum, maximum = torch.minimum, staticmethod(lambda x, c: x.clamp(min=c))

        result = self._paged_summary(_On, used, cu, table, page_size, torch.stack,
                                     lambda x: x.numel())
        return result if type(result) is tuple else tuple(result.tolist())


class CupyFramework(Framework):
    name = "cupy"

    def info(self, x) -> ArrayInfo:
        itemsize = x.itemsize
        strides = tuple(s // itemsize if s % itemsize == 0 else s / itemsize for s in x.strides)
        return ArrayInfo(tuple(x.shape), strides, str(x.dtype), x.device.id, x.data.ptr)

    def ptr(self, x) -> int:
        return x.data.ptr

    def signature(self, arrays):
        layouts, ptrs = [], []
        for x in arrays:
            if x is None:
                layouts.append(None)
                ptrs.append(0)
            elif type(x) is _NDARRAY:
                data = x.data
                layouts.append((x.shape, x.strides, x.dtype, data.device_id))
                ptrs.append(data.ptr)
            else:
                return None
        return tuple(layouts), ptrs

    def empty(self, shape, like, dtype=None):
        # The input's own dtype object: CuPy spells bfloat16 through ml_dtypes, which we never name.
        with like.device:
            return cupy.empty(shape, dtype=like.dtype if dtype is None else dtype)

    def stream_ptr(self, device):
        with cupy.cuda.Device(device):
            return cupy.cuda.get_current_stream().ptr

    def copy(self, x):
        with x.device:
            return x.copy()

    def copy_into(self, dst, src):
        with dst.device:
            dst[...] = src

    def zero_(self, x):
        with x.device:
            x.fill(0)

    def offsets_summary(self, cu):
        with cu.device:
            steps = cu[1:] - cu[:-1]
            if steps.size == 0:
                steps = cupy.zeros(1, dtype=cu.dtype)
            return tuple(int(x) for x in cupy.stack([cu[0], cu[-1], steps.min(), steps.max()]).get())

    def used_summary(self, used, cu):
        if used.size == 0:
            return 0, 0
        with used.device:
            excess = used - (cu[1:] - cu[:-1])
            return tuple(int(x) for x in cupy.stack([used.min(), excess.max()]).get())

    def paged_summary(self, used, cu, table, page_size):
        with table.device:
            result = self._paged_summary(cupy, used, cu, table, page_size, cupy.stack,
                                         lambda x: x.size)
            return result if type(result) is tuple else tuple(int(x) for x in result.get())


_CUPY = CupyFramework()
_NDARRAY = cupy.ndarray
# Set together by _torch_seen() once torch has been imported (by anyone) and a call brings a
# tensor or asks for the torch side: until then no type is `_TENSOR`, so the identity check in
# framework_of fails without touching torch.
_TENSOR = None
_TORCH = None


def _torch_seen():
    """Builds the torch side if torch has been imported; False while it has not."""
    global _TENSOR, _TORCH
    if _TORCH is not None:
        return True
    torch = sys.modules.get("torch")
    # getattr: torch may be half-way through its own import (sys.modules holds it from the start).
    if torch is None or getattr(torch, "Tensor", None) is None:
        return False
    _TORCH = TorchFramework(torch)
    _TENSOR = torch.Tensor
    return True


def torch_framework() -> TorchFramework:
    """The torch Framework, for code that already holds torch tensors (the custom ops)."""
    if _TORCH is None and not _torch_seen():
        raise RuntimeError("cupy_varlen: torch has not been imported")
    return _TORCH


def is_torch(x) -> bool:
    """Whether ``x`` is a torch tensor (a subclass too), without importing torch."""
    if type(x) is _TENSOR:
        return True
    return _torch_seen() and isinstance(x, _TENSOR)


def framework_of(x):
    """The framework whose arrays ``x`` is, or None (after DLPack import, see :func:`adopt`).

    The common cases are one or two identity checks: this runs several times per call."""
    t = type(x)
    if t is _TENSOR:
        return _TORCH
    if t is _NDARRAY:
        return _CUPY
    if isinstance(x, _NDARRAY):
        return _CUPY
    # Tensor subclasses (nn.Parameter, fake tensors), and the first tensor of the process.
    if _torch_seen() and isinstance(x, _TENSOR):
        return _TORCH
    return None


def adopt(x):
    """Brings a foreign device array in as CuPy through DLPack (zero-copy); torch and CuPy arrays,
    and anything that is not a device array, pass as they are (validation names them)."""
    t = type(x)
    if x is None or t is _TENSOR or t is _NDARRAY:
        return x
    if framework_of(x) is None and hasattr(x, "__dlpack__"):
        try:
            return cupy.from_dlpack(x)
        except Exception:  # host memory or an unsupported dtype: leave it for the type check
            return x
    return x
