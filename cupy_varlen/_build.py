"""Source assembly, NVRTC compilation, the compile cache and kernel handles.

The whole translation unit is assembled here from ``cuda_src/``: starting at the spec's kernel file,
every ``#include "name"`` line is replaced by that file (once per translation unit, as ``#pragma
once`` would), so the cache key (a hash of every source byte, the options and the NVRTC version)
covers everything that goes into the cubin and no header is found through ``-I``, whose files CuPy's
and NVRTC's caches would not see change. Compilation goes straight through CuPy's NVRTC binding
(``cupy.cuda.nvrtc``), which works without a GPU, so the CPU test suite compiles every
specialization and reads the ptxas resource report.

Cache: in memory per process, and on disk under ``$CUPY_VARLEN_CACHE_DIR`` (default
``~/.cache/cupy_varlen``). Disk entries carry a checksum; a corrupt entry is recompiled and
replaced, an unwritable directory falls back to memory only, and concurrent writers each publish a
complete file with an atomic rename.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import tempfile
import threading
from pathlib import Path

__all__ = ["SOURCE_DIR", "assemble_files", "assemble_source", "source_files", "compile_spec",
           "CompiledSpec", "ResourceUsage"]


def _find_source_dir() -> Path:
    here = Path(__file__).resolve().parent
    # Installed wheel: the sources ship inside the package. Source tree: they sit beside it.
    for candidate in (here / "cuda_src", here.parent / "cuda_src"):
        if (candidate / "fwd_sm80.cu").is_file():
            return candidate
    raise RuntimeError(f"cupy_varlen: CUDA sources not found next to {here}")


SOURCE_DIR = _find_source_dir()
_CACHE_FORMAT = "cupy_varlen-cubin-v1"


@functools.lru_cache(maxsize=None)
def _read_source(name: str) -> str:
    return (SOURCE_DIR / name).read_text()


_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*(["<])([^">]+)[">][^\n]*$', re.MULTILINE)
_PRAGMA_ONCE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*$", re.MULTILINE)


class SourceError(RuntimeError):
    """A cuda_src file that cannot be assembled: a missing file, an include cycle, or an include
    of a system header (NVRTC runs without the toolkit's headers)."""


def _resolve(name: str, emitted: list, chain: tuple) -> list:
    """The text of ``name`` with its includes expanded, as a list of parts; ``emitted`` collects the
    files already in the translation unit, in the order they entered it."""
    if name in chain:
        raise SourceError(f"include cycle: {' -> '.join(chain + (name,))}")
    if name in emitted:
        return []
    try:
        text = _PRAGMA_ONCE.sub("", _read_source(name))
    except OSError as e:
        including = f" (included by {chain[-1]})" if chain else ""
        raise SourceError(f"cupy_varlen: CUDA source {name!r} not found{including}") from e
    emitted.append(name)
    parts, pos, line = [f'#line 1 "{name}"\n'], 0, 1
    for m in _INCLUDE.finditer(text):
        if m.group(1) == "<":
            raise SourceError(f"{name}: system include <{m.group(2)}> (NVRTC has no toolkit "
                              "headers; put what is needed in cuda_src/)")
        line += text.count("\n", pos, m.end())
        parts.append(text[pos:m.start()])
        parts.extend(_resolve(m.group(2), emitted, chain + (name,)))
        # Back in this file after the included one: messages keep naming the right line.
        parts.append(f'\n#line {line + 1} "{name}"')
        pos = m.end()
    parts.append(text[pos:])
    return parts


def assemble_files(*names: str) -> str:
    """The named cuda_src files in order, each with its includes expanded and every file once, with
    #line markers so compiler messages name the original file and line."""
    emitted = []
    return "".join(part for name in names for part in _resolve(name, emitted, ()))


def assemble_source(spec) -> str:
    """The complete translation unit for ``spec``: its kernel file with every include expanded."""
    return assemble_files(spec.source)


def source_files(spec) -> tuple:
    """The cuda_src files in ``spec``'s translation unit, in the order they enter it."""
    emitted = []
    _resolve(spec.source, emitted, ())
    return tuple(emitted)


@dataclasses.dataclass(frozen=True)
class ResourceUsage:
    """ptxas' report for one kernel entry."""

    registers: int
    stack_frame: int
    spill_stores: int
    spill_loads: int
    shared_static: int

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0 or self.stack_frame > 0


_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_REGS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_report(log: str) -> dict:
    """Maps each kernel entry in an NVRTC log (compiled with --ptxas-options=-v) to its usage."""
    usage = {}
    current = None
    frame = regs = smem = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current, frame, regs, smem = m.group(1), None, None, 0
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            frame = tuple(int(x) for x in m.groups())
        m = _REGS.search(line)
        if m:
            regs = int(m.group(1))
            m2 = _SMEM.search(line)
            smem = int(m2.group(1)) if m2 else 0
        if frame is not None and regs is not None:
            usage[current] = ResourceUsage(regs, frame[0], frame[1], frame[2], smem)
            current = None
    return usage


@dataclasses.dataclass(frozen=True)
class CompiledSpec:
    spec: object
    cubin: bytes
    log: str
    from_disk: bool
    key: str  # the cache key: a hash of the source text, options and NVRTC version

    @functools.cached_property
    def usage(self) -> dict:
        return parse_ptxas_report(self.log)


def _nvrtc():
    from cupy.cuda import nvrtc

    return nvrtc


@functools.lru_cache(maxsize=None)
def _nvrtc_version() -> tuple:
    return tuple(_nvrtc().getVersion())


def _cache_key(spec, source: str) -> str:
    h = hashlib.sha256()
    for part in (_CACHE_FORMAT, repr(_nvrtc_version()), "\0".join(spec.options), source):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def cache_dir() -> Path:
    env = os.environ.get("CUPY_VARLEN_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "cupy_varlen"


def _pack_entry(cubin: bytes, log: str) -> bytes:
    meta = json.dumps({"log": log, "size": len(cubin)}).encode()
    body = len(meta).to_bytes(8, "little") + meta + cubin
    return hashlib.sha256(body).digest() + body


def _unpack_entry(blob: bytes):
    """(cubin, log), or None when the entry is truncated or corrupt."""
    if len(blob) < 40 or hashlib.sha256(blob[32:]).digest() != blob[:32]:
        return None
    body = blob[32:]
    meta_len = int.from_bytes(body[:8], "little")
    try:
        meta = json.loads(body[8 : 8 + meta_len])
    except ValueError:
        return None
    cubin = body[8 + meta_len :]
    if len(cubin) != meta.get("size"):
        return None
    return cubin, meta["log"]


def _load_from_disk(path: Path):
    try:
        return _unpack_entry(path.read_bytes())
    except OSError:
        return None


def _store_to_disk(path: Path, cubin: bytes, log: str) -> None:
    # Write-then-rename: readers see either no file or a complete one, and two processes that
    # compile the same spec at once both publish the same bytes. Any OSError (read-only or full
    # disk, permissions) leaves us with the in-memory copy only.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_pack_entry(cubin, log))
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


class CompileError(RuntimeError):
    pass


def _nvrtc_compile(source: str, options: tuple, name: str):
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(source, name, (), ())
    try:
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as e:
            raise CompileError(
                f"NVRTC failed to compile {name}:\n{nvrtc.getProgramLog(prog)}"
            ) from e
        return nvrtc.getCUBIN(prog), nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


_memory_cache: dict = {}
_lock = threading.Lock()


def compile_spec(spec, *, use_disk_cache: bool = True) -> CompiledSpec:
    """The cubin and ptxas log for ``spec``, from memory, disk, or a fresh NVRTC compile."""
    source = assemble_source(spec)
    key = _cache_key(spec, source)
    hit = _memory_cache.get(key)
    if hit is not None:
        return hit
    with _lock:
        hit = _memory_cache.get(key)
        if hit is not None:
            return hit
        path = cache_dir() / f"{key}.cubin"
        entry = _load_from_disk(path) if use_disk_cache else None
        if entry is not None:
            compiled = CompiledSpec(spec, entry[0], entry[1], True, key)
        else:
            cubin, log = _nvrtc_compile(source, spec.options, f"{spec.kernel_name}.cu")
            if use_disk_cache:
                _store_to_disk(path, cubin, log)
            compiled = CompiledSpec(spec, cubin, log, False, key)
        _memory_cache[key] = compiled
        return compiled


class LoadedKernels:
    """A spec's kernels loaded on one device: one attribute per role of ``spec.entry_points``
    (``main`` and ``schedule`` for every spec)."""

    def __init__(self, module, functions: dict):
        self.module = module
        for role, function in functions.items():
            setattr(self, role, function)


_loaded: dict = {}


def load_kernels(spec, device_id: int) -> LoadedKernels:
    """Kernel handles for ``spec`` on ``device_id`` (which must be CuPy's current device)."""
    from cupy.cuda import driver, function

    # Keyed by the compiled source, not by the spec alone: a spec names a specialization, and the
    # same spec over other source text (benchmarks/lab/ab_sources.py swaps sources in one process)
    # must load its own module.
    compiled = compile_spec(spec)
    loaded = _loaded.get((compiled.key, device_id))
    if loaded is not None:
        return loaded
    module = function.Module()
    module.load(compiled.cubin)
    functions = {}
    for role, (name, smem) in spec.entry_points.items():
        functions[role] = module.get_function(name)
        if smem > 48 * 1024:
            driver.funcSetAttribute(
                functions[role].ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem
            )
    loaded = LoadedKernels(module, functions)
    _loaded[(compiled.key, device_id)] = loaded
    return loaded


def clear_memory_cache() -> None:
    """Forget compiled and loaded kernels (tests use this to exercise the disk cache)."""
    _memory_cache.clear()
    _loaded.clear()

