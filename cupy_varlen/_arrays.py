"""The torch / CuPy bridge: what an array is, where it lives, how to allocate beside it.

Kernels take raw device pointers, so neither framework's array has to be converted to run one: a
torch tensor is read through ``data_ptr()`` and ``stride()``, a CuPy array through ``data.ptr`` and
``strides``, zero-copy either way. Outputs are allocated by the caller's framework (torch's caching
allocator, so CUDA graphs and memory accounting work) and kernels go on its current stream. Any
other object with ``__dlpack__`` is taken in through ``cupy.from_dlpack`` (zero-copy) and answered
with CuPy arrays.
"""

from __future__ import annotations

try:  # torch is optional: CuPy-only use must work without it
    import torch
except ImportError:  # pragma: no cover - exercised only where torch is absent
    torch = None

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

    def offsets_summary(self, cu) -> tuple:
        """(first, last, smallest step, largest step) of a 1-D offsets array, reduced on its device
        and read back in one transfer (this synchronizes: check_inputs=True only)."""
        raise NotImplementedError


class TorchFramework(Framework):
    name = "torch"

    def __init__(self):
        self._dtypes = {
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
            "float32": torch.float32,
            "int32": torch.int32,
        }
        self._names = {v: k for k, v in self._dtypes.items()}

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

    def empty(self, shape, like, dtype=None):
        # new_empty: about 1 us less per call than torch.empty(..., device=like.device).
        return like.new_empty(shape) if dtype is None else like.new_empty(
            shape, dtype=self._dtypes[dtype])

    def stream_ptr(self, device):
        # The raw cudaStream_t straight from torch's C API (what Triton's launcher reads): building a
        # torch.cuda.Stream object per call costs several microseconds.
        if _raw_stream is not None:
            return _raw_stream(device)
        return torch.cuda.current_stream(device).cuda_stream

    def copy(self, x):
        return x.clone(memory_format=torch.contiguous_format)

    def copy_into(self, dst, src):
        dst.copy_(src)

    def offsets_summary(self, cu):
        steps = cu[1:] - cu[:-1]
        if steps.numel() == 0:
            steps = torch.zeros(1, dtype=cu.dtype, device=cu.device)
        return tuple(torch.stack([cu[0], cu[-1], steps.min(), steps.max()]).tolist())


class CupyFramework(Framework):
    name = "cupy"

    def info(self, x) -> ArrayInfo:
        itemsize = x.itemsize
        strides = tuple(s // itemsize if s % itemsize == 0 else s / itemsize for s in x.strides)
        return ArrayInfo(tuple(x.shape), strides, str(x.dtype), x.device.id, x.data.ptr)

    def ptr(self, x) -> int:
        return x.data.ptr

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

    def offsets_summary(self, cu):
        with cu.device:
            steps = cu[1:] - cu[:-1]
            if steps.size == 0:
                steps = cupy.zeros(1, dtype=cu.dtype)
            return tuple(int(x) for x in cupy.stack([cu[0], cu[-1], steps.min(), steps.max()]).get())


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) if torch is not None else None
_TORCH = TorchFramework() if torch is not None else None
_CUPY = CupyFramework()


def framework_of(x):
    """The framework whose arrays ``x`` is, or None (after DLPack import, see :func:`adopt`)."""
    if _TORCH is not None and (type(x) is torch.Tensor or isinstance(x, torch.Tensor)):
        return _TORCH
    if isinstance(x, cupy.ndarray):
        return _CUPY
    return None


def adopt(x):
    """Brings a foreign device array in as CuPy through DLPack (zero-copy); torch and CuPy arrays,
    and anything that is not a device array, pass as they are (validation names them)."""
    if x is None or (_TORCH is not None and type(x) is torch.Tensor):
        return x
    if framework_of(x) is None and hasattr(x, "__dlpack__"):
        try:
            return cupy.from_dlpack(x)
        except Exception:  # host memory or an unsupported dtype: leave it for the type check
            return x
    return x
