"""What importing cupy_varlen costs and pulls in (CPU, each in a fresh interpreter).

CuPy-only users must not pay for torch: ``import cupy_varlen`` leaves torch unimported, and a call
on CuPy (or any non-torch) arrays keeps it that way. torch comes with ``compat``, ``reference``,
``distributed`` and the first torch tensor. The package's modules import each other without a
cycle.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPOSITORY, run_python

PACKAGE = REPOSITORY / "cupy_varlen"
TESTS = REPOSITORY / "tests"


def test_import_does_not_import_torch():
    out = run_python(
        "import sys, cupy_varlen\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
        "print(sorted(m for m in sys.modules if m.startswith('cupy_varlen')))\n")
    torch_modules, ours = out.splitlines()
    assert torch_modules == "[]"
    assert "cupy_varlen._torch" not in ours and "cupy_varlen.compat" not in ours
    assert "cupy_varlen._provider" not in ours


def test_import_after_torch_registers_the_flash_attention_impl_without_loading_it():
    """torch imported first: the registry learns the name, the provider module stays unloaded
    until activation, and nothing is activated."""
    out = run_python(
        "import sys, torch, cupy_varlen\n"
        "import torch.nn.attention as A\n"
        "if not hasattr(A, 'register_flash_attention_impl'):\n"
        "    print('no registry'); raise SystemExit\n"
        "print('cupy_varlen' in A.list_flash_attention_impls())\n"
        "print('cupy_varlen._provider' in sys.modules, A.current_flash_attention_impl())\n")
    if out.strip() != "no registry":
        assert out.split() == ["True", "False", "None"]


@pytest.mark.parametrize("attribute", ["compat", "reference", "distributed"])
def test_lazy_submodules_import_torch_on_access(attribute):
    run_python(
        "import sys, cupy_varlen\n"
        "assert 'torch' not in sys.modules\n"
        f"module = cupy_varlen.{attribute}\n"
        f"assert module is sys.modules['cupy_varlen.{attribute}']\n"
        "assert 'torch' in sys.modules\n"
        f"assert '{attribute}' in dir(cupy_varlen)\n")


def test_star_import_still_offers_reference():
    run_python(
        "from cupy_varlen import *\n"
        "assert callable(varlen_attn) and callable(varlen_attn_backward)\n"
        "assert callable(reference.varlen_attn_reference)\n")


def test_unknown_attribute_is_an_attribute_error():
    run_python(
        "import cupy_varlen\n"
        "try:\n"
        "    cupy_varlen.no_such_thing\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_thing' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n")


def test_calls_on_non_torch_arrays_leave_torch_alone():
    """The routing decision for a non-tensor q must not import torch (numpy arrays stand in for
    CuPy ones here: no GPU needed, and both fail the same way short of torch)."""
    run_python(
        "import sys, numpy as np, cupy_varlen\n"
        "x = np.zeros((4, 1, 8), np.float16)\n"
        "cu = np.array([0, 4], np.int32)\n"
        "for call in (lambda: cupy_varlen.varlen_attn(x, x, x, cu, cu, 4, 4),\n"
        "             lambda: cupy_varlen.varlen_attn_backward(x, x, x, x, x, x, cu, cu, 4, 4)):\n"
        "    try:\n"
        "        call()\n"
        "    except TypeError as e:\n"
        "        assert 'torch tensor or CuPy array' in str(e), e\n"
        "    else:\n"
        "        raise SystemExit('no TypeError')\n"
        "assert 'torch' not in sys.modules\n")


def test_torch_integration_loads_with_the_first_tensor():
    """torch imported by the user is not enough: the custom ops are created (and their flop
    formulas registered) when a torch tensor first reaches a call."""
    run_python(
        "import sys, torch, cupy_varlen\n"
        "from torch.utils.flop_counter import flop_registry\n"
        "assert 'cupy_varlen._torch' not in sys.modules\n"
        "assert not hasattr(torch.ops.cupy_varlen, 'varlen_attn')\n"
        "q = torch.zeros(4, 1, 8, dtype=torch.float16)\n"
        "cu = torch.tensor([0, 4], dtype=torch.int32)\n"
        "try:\n"
        "    cupy_varlen.varlen_attn(q, q, q, cu, cu, 4, 4)\n"
        "except ValueError as e:\n"
        "    assert 'CUDA device' in str(e), e\n"
        "assert 'cupy_varlen._torch' in sys.modules\n"
        "assert torch.ops.cupy_varlen.varlen_attn in flop_registry\n"
        "assert torch.ops.cupy_varlen.varlen_attn_backward in flop_registry\n")


def test_import_time_beyond_cupy():
    """``import cupy_varlen`` costs at most 0.5 s beyond CuPy's own import (generous: the best of
    three fresh interpreters, so a loaded machine does not fail it)."""
    code = ("import time\n"
            "t0 = time.perf_counter()\n"
            "import cupy\n"
            "t1 = time.perf_counter()\n"
            "import cupy_varlen\n"
            "print(time.perf_counter() - t1)\n")
    best = min(float(run_python(code)) for _ in range(3))
    assert best <= 0.5, f"import cupy_varlen took {best:.3f} s beyond import cupy"


def _module_level_imports(path: Path) -> set:
    """The package modules that ``path`` imports at module level (not inside functions)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        nodes = [node]
        if isinstance(node, ast.Try):  # a guarded import is still a module-level one
            nodes = node.body + [n for h in node.handlers for n in h.body] + node.orelse
        for n in nodes:
            if isinstance(n, ast.ImportFrom) and n.level == 1:
                if n.module:
                    found.add(n.module.split(".")[0])
                else:
                    found.update(alias.name for alias in n.names)
            elif isinstance(n, ast.ImportFrom) and (n.module or "").startswith("cupy_varlen."):
                found.add(n.module.split(".")[1])
            elif isinstance(n, ast.Import):
                found.update(a.name.split(".")[1] for a in n.names
                             if a.name.startswith("cupy_varlen."))
    return found


def test_no_import_cycle():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {m: _module_level_imports(PACKAGE / f"{m}.py") & modules for m in modules}
    assert "_torch" not in graph["_api"], "_api must import _torch lazily"
    visiting, done = [], set()

    def visit(m):
        if m in done:
            return
        assert m not in visiting, "import cycle: " + " -> ".join(visiting[visiting.index(m):] + [m])
        visiting.append(m)
        for dep in sorted(graph[m]):
            visit(dep)
        visiting.pop()
        done.add(m)

    for m in sorted(modules):
        visit(m)


def test_missing_hypothesis_fails_loudly():
    """tests/test_fuzz.py without hypothesis: a collection error (non-zero exit), not a skip."""
    code = ("import sys\n"
            "class NoHypothesis:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'hypothesis':\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
            "sys.meta_path.insert(0, NoHypothesis())\n"
            "import pytest\n"
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', "
            f"{str(TESTS / 'test_fuzz.py')!r}]))\n")
    # No plugin autoload: hypothesis' own pytest plugin would import it first.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPOSITORY)] + sys.path),
               PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=REPOSITORY, timeout=300)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, proc.stdout + proc.stderr
    assert "No module named 'hypothesis'" in proc.stdout and "skipped" not in proc.stdout
