"""Kernel specializations compile through CuPy's NVRTC with no register spills and none of the
ptxas advisories that silently cost speed; sources assemble from their #include lines; the compile
cache is keyed and stored soundly. No GPU needed: NVRTC compiles for any target.

By default a representative spec of every kernel family x architecture x head-dim tile class
compiles (about 40 of the 800 without score modifiers; a compile takes seconds), and one with
every score modifier per kernel family x architecture. ``CUPY_VARLEN_COMPILE_ALL=1``, as CI runs
it, compiles every spec the dispatcher can choose without modifiers, every one with all of them
(the variant that holds the most live state), and each modifier alone on a representative set of
the specs the dispatcher returns with it: 1,678 specs on as many threads as there are cores (NVRTC
releases the GIL). Specs with some but not all of the modifiers (most of the 4,512 with any) are
left out: each modifier's code in them is the code compiled in the all-on and the single-modifier
specs."""

from __future__ import annotations

import concurrent.futures
import functools
import os
import stat
import uuid

import pytest

from cupy_varlen import _build, _spec

SPECS = _spec.all_fwd_specs()
BWD_SPECS = _spec.all_bwd_specs()
COMPILE_ALL = os.environ.get("CUPY_VARLEN_COMPILE_ALL", "") not in ("", "0")


def _tile_class(spec) -> str:
    """Head-dim tiles that share a tile shape family: register budgets and warp counts change at
    these bounds (sm80: 4 warps up to 128, 8 above; sm90: one tile shape per head dim)."""
    if spec.kernel == "sm90":
        return f"d{spec.head_dim_tile} {spec.tiles.block_m}x{spec.tiles.block_n}"
    return "small" if spec.head_dim_tile <= 64 else "medium" if spec.head_dim_tile <= 128 else "large"


def representative_specs(specs) -> list:
    """One spec per (kind, kernel family, architecture, tile class). Within each group the pick
    rotates with the group's number, so that across groups both dtypes, both mask kinds and both
    dQ modes are compiled."""
    groups = {}
    for spec in specs:
        groups.setdefault((type(spec).__name__, spec.kernel, spec.arch, _tile_class(spec)),
                          []).append(spec)
    chosen = []
    for number, members in enumerate(groups.values()):
        # Stride through the group so consecutive groups land on different (dtype, mask, mode).
        chosen.append(members[(number * 7) % len(members)])
    return chosen


def _every_mod_spec():
    """Every spec with all the modifiers on, as the dispatcher chooses them."""
    return (_spec.all_fwd_specs(mods=(_spec.FWD_MODS,))
            + _spec.all_bwd_specs(mods=(_spec.BWD_MODS,)))


def single_modifier_specs(name) -> list:
    """The specs the dispatcher returns with the modifier ``name`` alone (its tiles may differ from
    the same call's without it)."""
    specs = _spec.all_fwd_specs(mods=((name,),))
    return specs + (_spec.all_bwd_specs(mods=((name,),)) if name in _spec.BWD_MODS else [])


def modifier_specs(compile_all: bool) -> list:
    """The modifier specs compiled: all-on for every spec and each modifier alone on a
    representative set of its own specs (compile_all), or all-on once per (kind, family,
    architecture)."""
    if not compile_all:
        groups = {}
        for spec in _every_mod_spec():
            groups.setdefault((type(spec).__name__, spec.kernel, spec.arch), []).append(spec)
        return [members[(n * 5) % len(members)] for n, members in enumerate(groups.values())]
    chosen = _every_mod_spec()
    for name in _spec.FWD_MODS:
        for single in representative_specs(single_modifier_specs(name)):
            if single not in chosen:
                chosen.append(single)
    return chosen


COMPILED_SPECS = ((SPECS + BWD_SPECS if COMPILE_ALL else representative_specs(SPECS + BWD_SPECS))
                  + modifier_specs(COMPILE_ALL))


def _compile_fresh(spec):
    # Straight through NVRTC with a unique trailing comment, so no cache on any level can answer
    # (NVRTC 13.0 was seen returning an empty ptxas report for a source it had compiled before).
    source = _build.assemble_source(spec) + f"\n// {uuid.uuid4()}\n"
    return _build._nvrtc_compile(source, spec.options, "spill_check.cu")


def _compile_report(spec):
    """(the cubin's first bytes, the log): what the spill check reads, without holding 1,678
    cubins."""
    cubin, log = _compile_fresh(spec)
    return cubin[:4], log


@functools.lru_cache(maxsize=1)
def _compiled_in_parallel():
    """With CUPY_VARLEN_COMPILE_ALL, every spec compiled up front on all cores: spec -> future."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2)
    return {spec: pool.submit(_compile_report, spec) for spec in COMPILED_SPECS}


def test_representative_specs_cover_every_family_arch_and_variant():
    chosen = representative_specs(SPECS + BWD_SPECS)
    for kind, specs in (("fwd", SPECS), ("bwd", BWD_SPECS)):
        mine = [s for s in chosen if s in specs]
        assert {(s.kernel, s.arch, _tile_class(s)) for s in specs} == {
            (s.kernel, s.arch, _tile_class(s)) for s in mine}, kind
        assert {s.dtype for s in mine} == set(_spec.DTYPES), kind
        assert {s.windowed for s in mine} == {False, True}, kind
    assert {s.deterministic for s in chosen if s in BWD_SPECS} == {False, True}
    assert len(chosen) <= 48, "the default compile budget (a few seconds a spec)"


def test_modifier_specs_cover_every_modifier_family_and_arch():
    for chosen in (modifier_specs(False), modifier_specs(True)):
        for specs in (_every_mod_spec(),):
            assert {(type(s), s.kernel, s.arch) for s in specs} <= {
                (type(s), s.kernel, s.arch) for s in chosen}
        for name in _spec.FWD_MODS:
            assert any(getattr(s, name, False) for s in chosen), name
    every = modifier_specs(True)
    assert len(set(every)) == len(every) and set(_every_mod_spec()) <= set(every)
    for name in _spec.FWD_MODS:  # each alone, on every (kind, family, arch, tile class) it has
        singles = single_modifier_specs(name)
        mine = [s for s in every if s in singles]
        assert {(type(s), s.kernel, s.arch, _tile_class(s)) for s in singles} == {
            (type(s), s.kernel, s.arch, _tile_class(s)) for s in mine}, name


def test_compiled_specs_are_ones_the_dispatcher_returns():
    """A spec built by hand (a modifier switched on over another call's tiles) would check code
    that never runs and miss the tiles that do."""
    sets = _spec.mod_sets(_spec.FWD_MODS)
    dispatched = set(_spec.all_fwd_specs(mods=sets)) | set(_spec.all_bwd_specs(mods=sets))
    assert set(COMPILED_SPECS) <= dispatched


@pytest.mark.parametrize("spec", COMPILED_SPECS, ids=str)
def test_specialization_compiles_without_spills(spec):
    cubin, log = (_compiled_in_parallel()[spec].result() if COMPILE_ALL
                  else _compile_fresh(spec))
    assert cubin[:4] == b"\x7fELF"
    # ptxas' advisories that silently cost the sm90 kernel its speed: wgmma serialized (C7513,
    # C7514, ...) or setmaxnreg ignored (C7508).
    assert "Potential Performance Loss" not in log and "C7508" not in log, log
    usage = _build.parse_ptxas_report(log)
    assert set(usage) == {name for name, _ in spec.entry_points.values()}, log
    for name, u in usage.items():
        assert not u.spills, f"{spec} {name}: {u}"
        if name == spec.kernel_name:  # the CTAs per SM the tile table was sized for fit
            assert u.registers * spec.threads * getattr(spec.tiles, "min_blocks", 1) <= 65536
    for _, smem in spec.entry_points.values():
        assert smem <= _spec.SMEM_LIMIT[spec.arch]


def test_backward_dispatch_covers_every_head_dim_and_mode():
    for arch in _spec.ARCHS:
        for head_dim in range(8, 257, 8):
            for deterministic in (False, True):
                spec = _spec.choose_bwd_spec("fp16", head_dim, True, arch, deterministic)
                assert spec.head_dim_tile >= head_dim and spec.head_dim_tile - head_dim < 32
                roles = set(spec.entry_points)
                # Deterministic: the dQ kernel on the sm80 family, ordered additions on sm90.
                dq_kernel = deterministic and spec.kernel != "sm90"
                assert roles == {"main", "schedule", "preprocess", "dsinks",
                                 "dq" if dq_kernel else "dq_convert"}
                assert spec.defines["CV_DQ_ATOMIC"] == int(not dq_kernel)
                assert spec.defines["CV_DQ_ORDERED"] == int(deterministic and not dq_kernel)
    with pytest.raises(ValueError, match="shared memory"):
        _spec.BwdSpec("bf16", 256, _spec.BwdTileConfig(128, 128, 8, 2, 8, 8, 8, 64), False,
                      "sm_86", False)


def test_sm90_backward_query_tile_width():
    """80 queries per step at head dim 128 without a mask in bf16, in both dQ modes (FA4's width);
    64 with a mask or in fp16; 128 at head dim 64. The 80-query tiles fill exactly the 227 KB of
    shared memory."""
    for det in (False, True):
        full = _spec.choose_bwd_spec("bf16", 128, False, "sm_90a", det)
        assert full.tiles.block_m == 80
        assert full.smem_bytes == _spec.SMEM_LIMIT["sm_90a"] == 232_448
        for other in (_spec.choose_bwd_spec("bf16", 128, True, "sm_90a", det),
                      _spec.choose_bwd_spec("fp16", 128, False, "sm_90a", det)):
            assert other.tiles.block_m == 64
        d64 = _spec.choose_bwd_spec("bf16", 64, False, "sm_90a", det)
        assert d64.tiles.block_m == 128
        # Both modes keep the dS buffers and the dQ staging: ordered mode adds like atomic mode.
        assert d64.smem_bytes == _spec.choose_bwd_spec("bf16", 64, False, "sm_90a",
                                                        not det).smem_bytes


def test_backward_dispatch_picks_the_kernel_family():
    for tile in _spec.HEAD_DIM_TILES:
        for det in (False, True):
            hopper = _spec.choose_bwd_spec("bf16", tile, False, "sm_90a", det)
            assert hopper.kernel == ("sm90" if tile in (64, 128) else "sm80")
            assert _spec.choose_bwd_spec("bf16", tile, True, "sm_90a", det, "sm80").kernel == "sm80"
            for arch in ("sm_80", "sm_86", "sm_89"):
                assert _spec.choose_bwd_spec("fp16", tile, False, arch, det, "sm90").kernel == "sm80"
    spec = _spec.choose_bwd_spec("bf16", 128, False, "sm_90a", False)
    assert spec.threads == _spec.SM90_THREADS and spec.source == "bwd_sm90.cu"
    assert "CV_WARPS" not in spec.defines and spec.defines["CV_DQ_ATOMIC"] == 1
    sm80 = _spec.choose_bwd_spec("bf16", 128, False, "sm_90a", False, "sm80")
    assert sm80.source == "bwd_sm80.cu" and sm80.defines["CV_WARPS"] == sm80.tiles.warps
    with pytest.raises(ValueError, match="auto, sm80 or sm90"):
        _spec.choose_bwd_spec("bf16", 128, False, "sm_90a", False, "fast")
    with pytest.raises(ValueError, match="needs sm_90a"):
        _spec.BwdSpec("bf16", 128, spec.tiles, False, "sm_80", False, "sm90")
    with pytest.raises(ValueError, match="needs sm_90a"):
        _spec.BwdSpec("bf16", 256, spec.tiles, False, "sm_90a", False, "sm90")


def test_every_arch_and_head_dim_has_a_spec():
    for arch in _spec.ARCHS:
        for head_dim in range(8, 257, 8):
            spec = _spec.choose_fwd_spec("bf16", head_dim, False, arch)
            assert spec.head_dim_tile >= head_dim and spec.head_dim_tile - head_dim < 32


def test_dispatch_picks_the_kernel_family():
    for tile in _spec.HEAD_DIM_TILES:
        hopper = _spec.choose_fwd_spec("bf16", tile, False, "sm_90a")
        assert hopper.kernel == ("sm90" if tile in (64, 128, 256) else "sm80")
        assert _spec.choose_fwd_spec("fp16", tile, True, "sm_90a", "sm80").kernel == "sm80"
        for arch in ("sm_80", "sm_86", "sm_89"):  # sm90 is Hopper-only, whatever the override
            assert _spec.choose_fwd_spec("bf16", tile, False, arch, "sm90").kernel == "sm80"
    spec = _spec.choose_fwd_spec("bf16", 128, False, "sm_90a")
    assert spec.persistent and spec.threads == _spec.SM90_THREADS
    # Long sequences at D64 take three consumer warpgroups; nothing else changes with long_rows.
    long64 = _spec.choose_fwd_spec("bf16", 64, True, "sm_90a", long_rows=True)
    assert (long64.tiles.block_m, long64.tiles.block_n, long64.threads) == (192, 96, 512)
    assert _spec.choose_fwd_spec("bf16", 64, True, "sm_90a").tiles.block_m == 128
    for tile in (128, 256):
        assert (_spec.choose_fwd_spec("bf16", tile, False, "sm_90a", long_rows=True)
                == _spec.choose_fwd_spec("bf16", tile, False, "sm_90a"))
    assert _spec.choose_fwd_spec("bf16", 64, False, "sm_90a", "sm80", True).kernel == "sm80"
    assert long64 in _spec.all_fwd_specs(("sm_90a",))
    mean = _spec.LONG_ROWS_MEAN
    assert _spec.long_rows(4 * mean, 4) and not _spec.long_rows(4 * mean - 1, 4)
    assert "CV_SUB_N" not in spec.defines and spec.source == "fwd_sm90.cu"
    with pytest.raises(ValueError, match="auto, sm80 or sm90"):
        _spec.choose_fwd_spec("bf16", 128, False, "sm_90a", "fast")
    with pytest.raises(ValueError, match="needs sm_90a"):
        _spec.FwdSpec("bf16", 128, spec.tiles, False, "sm_80", "sm90")


def test_arch_for_capability():
    assert _spec.arch_for_capability(8, 0) == "sm_80"
    assert _spec.arch_for_capability(8, 7) == "sm_80"
    assert _spec.arch_for_capability(8, 6) == "sm_86"
    assert _spec.arch_for_capability(8, 9) == "sm_89"
    assert _spec.arch_for_capability(9, 0) == "sm_90a"
    with pytest.raises(RuntimeError, match="8.0 or newer"):
        _spec.arch_for_capability(7, 5)


def test_source_assembly_inlines_every_file_once():
    for spec in (SPECS[0], _spec.choose_fwd_spec("bf16", 128, False, "sm_90a"),
                 _spec.choose_bwd_spec("bf16", 64, True, "sm_90a", False)):
        source = _build.assemble_source(spec)
        files = _build.source_files(spec)
        assert files[0] == spec.source and len(set(files)) == len(files)
        for name in files:
            assert source.count(f'#line 1 "{name}"') == 1, name
        assert "#include" not in source  # nothing can be picked up behind the cache key's back
        assert "#pragma once" not in source
    bwd = _build.source_files(_spec.choose_bwd_spec("bf16", 64, True, "sm_90a", False))
    assert {"bwd_common.cuh", "wgmma.cuh", "pipeline.cuh", "scheduler.cuh"} <= set(bwd)


def _every_source_file():
    return sorted(p.name for p in _build.SOURCE_DIR.iterdir() if p.suffix in (".cu", ".cuh"))


@pytest.mark.parametrize("name", _every_source_file())
def test_each_source_file_includes_what_it_uses(name):
    """Every file compiles on its own with just its #include lines (and a spec's -D macros): the
    include lines are the real dependency graph, not a record of some file order that happens to
    work."""
    spec = (_spec.choose_bwd_spec("bf16", 64, True, "sm_90a", False) if "bwd" in name
            else _spec.choose_fwd_spec("bf16", 64, True, "sm_90a"))
    if "sm80" in name:
        spec = (_spec.choose_bwd_spec("bf16", 64, True, "sm_90a", False, "sm80") if "bwd" in name
                else _spec.choose_fwd_spec("bf16", 64, True, "sm_90a", "sm80"))
    source = "".join(_build._resolve(name, [], ()))
    cubin, log = _build._nvrtc_compile(source, spec.options, f"{name}.cu")
    assert cubin[:4] == b"\x7fELF", log


def test_include_resolution_follows_lines_and_rejects_cycles(monkeypatch):
    files = {
        "main.cu": '// top\n#include "a.cuh"\n#include "b.cuh"\nint main_line;\n',
        "a.cuh": '#pragma once\n#include "b.cuh"\nint a;\n',
        "b.cuh": "#pragma once\nint b;\n",
        "cycle.cuh": '#include "cycle2.cuh"\n',
        "cycle2.cuh": '#include "cycle.cuh"\n',
        "system.cuh": "#include <cstdio>\n",
        "missing.cuh": '#include "nowhere.cuh"\n',
    }

    def read(name):
        if name not in files:
            raise FileNotFoundError(name)
        return files[name]

    monkeypatch.setattr(_build, "_read_source", read)

    class Probe:
        source = "main.cu"

    source = _build.assemble_source(Probe)
    assert _build.source_files(Probe) == ("main.cu", "a.cuh", "b.cuh")
    assert source.count("int b;") == 1  # included twice, expanded once
    # After each expansion the file resumes at the right line: main.cu's last line is line 4.
    assert '#line 4 "main.cu"\nint main_line;' in source
    for entry, message in (("cycle.cuh", "include cycle"), ("system.cuh", "system include"),
                           ("missing.cuh", "not found")):
        Probe.source = entry
        with pytest.raises(_build.SourceError, match=message):
            _build.assemble_source(Probe)


def test_cache_key_covers_options_and_source(monkeypatch):
    spec = SPECS[0]
    source = _build.assemble_source(spec)
    key = _build._cache_key(spec, source)
    assert key == _build._cache_key(spec, source)
    assert key != _build._cache_key(spec, source + " ")
    other = _spec.FwdSpec(spec.dtype, spec.head_dim_tile, spec.tiles, not spec.windowed, spec.arch)
    assert key != _build._cache_key(other, source)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CUPY_VARLEN_CACHE_DIR", str(tmp_path / "cache"))
    _build.clear_memory_cache()
    yield tmp_path / "cache"
    _build.clear_memory_cache()


def test_loaded_kernels_follow_the_source(cache_dir, monkeypatch):
    """A spec over edited source text loads its own module: kernels are not cached by spec alone
    (benchmarks/lab/ab_sources.py swaps sources within one process and times whatever is loaded)."""
    from conftest import cuda_available

    if not cuda_available():
        pytest.skip("needs a CUDA GPU")
    import cupy

    from cupy_varlen import _api

    device = cupy.cuda.Device().id
    spec = _spec.choose_fwd_spec("bf16", 64, False, _api._device_arch(device))
    first = _build.load_kernels(spec, device)
    assert _build.load_kernels(spec, device) is first
    original = _build._read_source
    monkeypatch.setattr(_build, "_read_source",
                        lambda name: original(name) + ("\n// edited\n" if name == spec.source else ""))
    edited = _build.load_kernels(spec, device)
    assert edited is not first and edited.module is not first.module
    monkeypatch.setattr(_build, "_read_source", original)
    assert _build.load_kernels(spec, device) is first


def test_disk_cache_roundtrip(cache_dir):
    spec = SPECS[0]
    first = _build.compile_spec(spec)
    assert not first.from_disk
    _build.clear_memory_cache()
    second = _build.compile_spec(spec)
    assert second.from_disk and second.cubin == first.cubin and second.log == first.log


def test_corrupt_cache_entry_is_recompiled(cache_dir):
    spec = SPECS[0]
    good = _build.compile_spec(spec)
    (entry,) = list(cache_dir.glob("*.cubin"))
    blob = entry.read_bytes()
    flipped = blob[:-1] + bytes([blob[-1] ^ 0xFF])
    for damage in (b"", blob[:100], flipped):
        entry.write_bytes(damage)
        _build.clear_memory_cache()
        again = _build.compile_spec(spec)
        assert not again.from_disk and again.cubin == good.cubin
        assert _build._unpack_entry(entry.read_bytes()) is not None  # replaced by a sound entry


_CONCURRENT_COMPILE = """
import hashlib, sys
from cupy_varlen import _build, _spec
spec = _spec.all_fwd_specs()[0]
compiled = _build.compile_spec(spec)
print(hashlib.sha256(compiled.cubin).hexdigest(), compiled.from_disk)
"""


def test_processes_compiling_one_spec_at_once_agree(cache_dir):
    """Several processes compiling the same specialization into one empty cache directory at the
    same time: every one gets a sound cubin, and the directory ends with one complete entry."""
    import subprocess
    import sys

    env = dict(os.environ, CUPY_VARLEN_CACHE_DIR=str(cache_dir))
    # The children import the same cupy_varlen as this process (source tree or installed wheel).
    root = os.path.dirname(os.path.dirname(os.path.abspath(_build.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_COMPILE], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(out.split())
    digests = {digest for digest, _ in results}
    assert len(digests) == 1, results  # NVRTC is deterministic: all publish the same bytes
    entries = list(cache_dir.glob("*"))
    assert len(entries) == 1 and entries[0].suffix == ".cubin", entries  # no stray temp files
    cubin, _ = _build._unpack_entry(entries[0].read_bytes())
    import hashlib

    assert hashlib.sha256(cubin).hexdigest() in digests


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_cache_dir_falls_back_to_memory(cache_dir):
    cache_dir.mkdir(parents=True)
    cache_dir.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        compiled = _build.compile_spec(SPECS[0])
        assert compiled.cubin[:4] == b"\x7fELF"
        assert not list(cache_dir.glob("*"))
    finally:
        cache_dir.chmod(stat.S_IRWXU)


def test_unwritable_cache_path_falls_back_to_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("CUPY_VARLEN_CACHE_DIR", str(blocker / "cache"))
    _build.clear_memory_cache()
    try:
        assert _build.compile_spec(SPECS[0]).cubin[:4] == b"\x7fELF"
    finally:
        _build.clear_memory_cache()


def test_ptxas_report_parser():
    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
        "ptxas info    : Function properties for k\n"
        "ptxas         .     24 bytes stack frame, 8 bytes spill stores, 16 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 128 bytes smem\n"
    )
    (usage,) = _build.parse_ptxas_report(log).values()
    assert (usage.registers, usage.stack_frame, usage.spill_stores, usage.spill_loads) == (
        255, 24, 8, 16)
    assert usage.shared_static == 128 and usage.spills


def _signature_types(source: str, kernel: str) -> list:
    """The parameter types of ``kernel``'s definition in ``source``, in order."""
    import re

    start = source.index(f"{kernel}(")
    params = source[start + len(kernel) + 1:source.index(")", start)]
    return [re.sub(r"\s+\w+$", "", p.strip()).replace("__restrict__", "").strip()
            for p in params.split(",")]


def test_launch_packing_matches_kernel_signatures():
    """Kernels with plain argument lists get their parameters as one packed buffer (cuLaunchKernel's
    `extra`): the format must list the signature's types in order, 8-byte fields never behind an
    odd number of 4-byte ones (the packing inserts no padding)."""
    from cupy_varlen import _launch

    size = {"Q": 8, "q": 8, "i": 4, "f": 4}

    def expected(types):
        codes = "".join("Q" if t.endswith("*") else {"i64": "q", "int": "i", "float": "f"}[t]
                        for t in types)
        offset = 0
        for c in codes:
            assert offset % size[c] == 0, (types, codes)
            offset += size[c]
        return codes

    def codes_of(fmt):
        import re

        return "".join(c * int(n or 1) for n, c in re.findall(r"(\d*)([Qqif])", fmt))

    fwd = (_build.SOURCE_DIR / "fwd_sm80.cu").read_text()
    sched = (_build.SOURCE_DIR / "scheduler.cuh").read_text()
    assert codes_of(_launch._SM80_PARAMS.format) == expected(_signature_types(fwd, "varlen_fwd"))
    assert codes_of(_launch._SCHEDULE_PARAMS.format) == expected(
        _signature_types(sched, "varlen_tile_schedule"))


def test_sm90_params_packing_matches_the_kernel_struct():
    """The sm90 kernel takes one by-value struct; the host packs it byte for byte. The kernel
    static_asserts its size (so every compile above checks that side), this checks the host's."""
    import struct

    from cupy_varlen import _launch

    packer = _launch._SM90_PARAMS
    source = (_build.SOURCE_DIR / "fwd_sm90.cu").read_text()
    assert f"sizeof(Params) == {packer.size}" in source
    k_map, v_map = bytes(range(128)), bytes(range(128, 256))
    blob = packer.pack(*range(1, 22), 22, 23, 24, 0.5, 0.25, 2.0, 4.0, -1, 7, 1, k_map, v_map)
    assert struct.unpack_from("<Q", blob, 0)[0] == 1  # q
    assert struct.unpack_from("<Q", blob, 64)[0] == 9  # seqused_k
    assert struct.unpack_from("<2Q", blob, 72) == (10, 11)  # alibi_slopes, sinks: the last
    assert struct.unpack_from("<q", blob, 88)[0] == 12  # q_row_stride, after 11 pointers
    assert struct.unpack_from("<q", blob, 160)[0] == 21  # alibi_batch_stride
    assert struct.unpack_from("<3i", blob, 168) == (22, 23, 24)  # heads_per_kv, num_heads, head_dim
    # scale, scale_log2, softcap_in, softcap_out
    assert struct.unpack_from("<4f", blob, 180) == (0.5, 0.25, 2.0, 4.0)
    assert struct.unpack_from("<2i", blob, 196) == (-1, 7)  # window
    assert struct.unpack_from("<i", blob, 204)[0] == 1  # use_tma
    # The maps are alignas(64): at 256 and 384, after the padding.
    assert blob[256:384] == k_map and blob[384:512] == v_map


def test_param_buffers_hold_the_packed_bytes_per_thread():
    """Launch parameters are packed in place into per-thread ctypes memory that every launch
    reuses: the bytes must be exactly the Struct's, the driver's pointers must lead to them (the
    kernelParams array for by-value structs, the `extra` triple otherwise), and a pack on another
    thread must not touch this thread's buffer."""
    import ctypes
    import threading

    from cupy_varlen import _launch

    fields = (11, 12, 0, 13, 4, 128, 64, -1, 0, 99, 1, 16, 2, 132, 1, 0)
    args = _launch._SCHEDULE_ARGS.pack(*fields)
    assert args.buf.raw == _launch._SCHEDULE_PARAMS.pack(*fields)
    extra = (ctypes.c_void_p * 5).from_address(args.extra)
    assert (extra[0], extra[2], extra[4] or 0) == (1, 2, 0)  # pointer key, size key, end
    assert extra[1] == ctypes.addressof(args.buf)
    assert ctypes.c_size_t.from_address(extra[3]).value == _launch._SCHEDULE_PARAMS.size
    assert args.kernel_params == 0

    maps = bytes(range(128)), bytes(range(128, 256))
    sm90_fields = (*range(1, 22), 1, 16, 64, 0.5, 0.25, 0.0, 0.0, -1, 0, 1, *maps)
    sm90 = _launch._SM90_ARGS.pack(*sm90_fields)
    assert sm90.buf.raw == _launch._SM90_PARAMS.pack(*sm90_fields)
    assert sm90.extra == 0
    assert (ctypes.c_void_p * 1).from_address(sm90.kernel_params)[0] == ctypes.addressof(sm90.buf)

    other = {}

    def pack_elsewhere():
        other["buf"] = _launch._SCHEDULE_ARGS.pack(*(x + 1 for x in fields)).buf.raw

    thread = threading.Thread(target=pack_elsewhere)
    thread.start()
    thread.join()
    assert other["buf"] == _launch._SCHEDULE_PARAMS.pack(*(x + 1 for x in fields))
    assert _launch._SCHEDULE_ARGS.buf.raw == _launch._SCHEDULE_PARAMS.pack(*fields)


def test_item_order_across_heads_only_where_k_and_v_fit_half_of_l2():
    from cupy_varlen import _launch

    l2 = 50 * 2**20  # H100
    assert _launch.lpt_across_heads(5824, 16, 64, l2)  # the seed batch: 23.9 MB of K and V
    assert not _launch.lpt_across_heads(139136, 32, 64, l2)  # B32 x 8k
    assert not _launch.lpt_across_heads(8192 + 63 * 128, 16, 128, l2)  # skewed: 66 MB
    half = l2 // 2 // (2 * 2 * 64)
    assert _launch.lpt_across_heads(half, 1, 64, l2) and not _launch.lpt_across_heads(
        half + 1, 1, 64, l2)


def test_tensor_maps_only_for_addressable_tensors(monkeypatch):
    """TMA needs a 16-byte aligned base and strides in whole 16-byte units; anything else (and a
    machine without the driver entry point) gets no map, and the kernel copies with cp.async."""
    from cupy_varlen import _tma

    assert _tma.tma_addressable(1 << 20, 4 * 64, 64, 64)
    assert not _tma.tma_addressable((1 << 20) + 2, 4 * 64, 64, 64)  # misaligned base
    assert not _tma.tma_addressable(1 << 20, 4 * 64 + 4, 64, 64)  # row stride of 8 bytes more
    assert not _tma.tma_addressable(1 << 20, 4 * 64, 60, 64)  # head stride
    assert not _tma.tma_addressable(1 << 20, 1 << 40, 64, 64)  # stride past TMA's range
    # fp32 (the backward's dQ accumulator): 16-byte rules in 4-byte elements.
    assert _tma.tma_addressable(1 << 20, 4 * 64, 64, 64, 4)
    assert not _tma.tma_addressable(1 << 20, 4 * 64 + 2, 64, 64, 4)  # row stride of 8 bytes more
    assert not _tma.tma_addressable(1 << 20, 4 * 64, 64, 62, 4)  # rows of 248 bytes
    monkeypatch.setattr(_tma, "_encode_tiled", lambda: None)
    _tma.tile_map.cache_clear()
    assert _tma.tile_map(1 << 20, "bf16", 100, 4, 64, 256, 64, 128) is None
    _tma.tile_map.cache_clear()


def test_backward_params_packing_matches_the_kernel_struct():
    """The backward kernels share one by-value BwdParams struct: 22 pointers, 21 int64 (strides,
    total_q, the dQ accumulator's size, the ALiBi slopes' batch stride), 3 int32, 4 float, 4 int32,
    and the tensor maps of q and dout from its 64-byte alignment on. Its size is static_asserted in
    the source."""
    import struct

    from cupy_varlen import _launch

    packer = _launch._BWD_PARAMS
    source = (_build.SOURCE_DIR / "bwd_common.cuh").read_text()
    assert f"sizeof(BwdParams) == {packer.size}" in source
    q_map, do_map = bytes(range(1, 129)), bytes(range(2, 130))
    blob = packer.pack(*range(1, 44), 44, 45, 46, 0.5, 0.25, 2.0, 4.0, -1, 7, 5, 1, q_map,
                       do_map)
    assert struct.unpack_from("<Q", blob, 0)[0] == 1  # q
    assert struct.unpack_from("<Q", blob, 120)[0] == 16  # schedule_q
    assert struct.unpack_from("<Q", blob, 128)[0] == 17  # dq_order
    # alibi_slopes, sinks, dsinks, sink_partials, sink_tickets: the last pointers
    assert struct.unpack_from("<5Q", blob, 136) == (18, 19, 20, 21, 22)
    assert struct.unpack_from("<q", blob, 176)[0] == 23  # q_row_stride
    assert struct.unpack_from("<q", blob, 320)[0] == 41  # total_q
    assert struct.unpack_from("<q", blob, 328)[0] == 42  # dq_accum_floats
    assert struct.unpack_from("<q", blob, 336)[0] == 43  # alibi_batch_stride
    assert struct.unpack_from("<3i", blob, 344) == (44, 45, 46)  # heads, heads_per_kv, head_dim
    # scale, scale_log2, softcap_in, softcap_out
    assert struct.unpack_from("<4f", blob, 356) == (0.5, 0.25, 2.0, 4.0)
    assert struct.unpack_from("<2i", blob, 372) == (-1, 7)  # window
    assert struct.unpack_from("<2i", blob, 380) == (5, 1)  # batch, use_qdo_map
    assert blob[448:576] == q_map and blob[576:704] == do_map  # alignas(64), after the padding
    # By-value structs with 64-byte aligned members go through kernelParams (see _ParamBuffer).
    assert _launch._BWD_ARGS.extra == 0 and _launch._BWD_ARGS.kernel_params != 0


@pytest.mark.parametrize("deterministic,arch", [(False, "sm_90a"), (True, "sm_90a"),
                                                (True, "sm_80")])
def test_backward_workspace_is_one_allocation(deterministic, arch):
    """The backward's scratch is one allocation: the fp32 part (dQ accumulator, lse_log2, delta)
    first, the int32 part (schedules, ordered counters) from a 16-byte boundary after it."""
    from cupy_varlen import _launch

    total_q, total_k, heads, heads_kv, head_dim, batch = 1000, 1200, 6, 2, 64, 5
    spec = _spec.choose_bwd_spec("bf16", head_dim, False, arch, deterministic)
    strides = {name: (heads * head_dim, head_dim)
               for name in ("q", "k", "v", "out", "dout", "dq", "dk", "dv")}
    launch = _launch.BackwardLaunch(
        None, spec, strides=strides, lse_strides=(total_q, 1), total_q=total_q, total_k=total_k,
        batch=batch, heads=heads, heads_kv=heads_kv, head_dim=head_dim, scale=0.1,
        scale_log2=0.1, window=(-1, -1), num_sms=132)
    floats = 2 * heads * total_q + launch.accum_bytes // 4
    ints = _launch.SCHEDULE_HEADER + 2 * _launch.tile_bound(total_k, batch, spec.tiles.block_n)
    if spec.dq_kernel:
        ints += _launch.SCHEDULE_HEADER + 2 * _launch.tile_bound(total_q, batch,
                                                                 spec.tiles.block_m)
    elif spec.ordered_dq:
        ints += 2 * heads * total_q
    assert launch.int_offset % 16 == 0 and launch.int_offset >= 4 * floats
    assert 4 * launch.workspace_entries - launch.int_offset == 4 * ints


@pytest.mark.parametrize("block_m", [64, 80, 128])
def test_sm90_dq_accumulator_slots_are_disjoint_and_bounded(block_m):
    """The sm90 family's dQ accumulator holds whole query tiles, sequence b's from slot
    (q_start + b block_m) // block_m on (cuda_src/bwd_sm90.cu, first_dq_slot). Each sequence's
    last slot lies below the next sequence's first, empty sequences included (dq_convert finds a
    slot's sequence as the last whose first slot is at or before it), and below the host's
    dq_accum_slots."""
    import numpy as np

    from cupy_varlen import _launch

    rng = np.random.default_rng(block_m)
    for trial in range(300):
        batch = int(rng.integers(1, 40))
        lens = (rng.integers(0, 3, batch) if trial % 3 == 0 else  # empty and one-row sequences
                rng.integers(1, 4 * block_m, batch) if trial % 3 == 1 else
                rng.choice([0, 1, block_m - 1, block_m, block_m + 1, 5 * block_m], batch))
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(int)
        first = [(int(cu[b]) + b * block_m) // block_m for b in range(batch + 1)]
        bound = _launch.dq_accum_slots(int(cu[-1]), batch, block_m)
        for b in range(batch):
            last = first[b] + -(-int(lens[b]) // block_m) - 1
            assert first[b] < first[b + 1] and last < first[b + 1]
            assert last < bound
