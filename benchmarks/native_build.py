"""How long the kernels take to be ready in a fresh process: this project's plain C build (the system compiler on
first use into a private cache, then a digest check and ``dlopen``) against the smallest
``torch.utils.cpp_extension`` build (one operator registered in C++ against PyTorch's headers, no kernels at all):
each on an empty cache, then warm, each in a process of its own. Writes ``results/native_build.json``.

    python benchmarks/native_build.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, commit, environment  # noqa: E402

OURS = """
import time
from sparsetrain.execution import native
t = time.perf_counter()
assert native.available()  # (the first call builds or loads the library)
print(time.perf_counter() - t)
"""

CPP_EXTENSION = r"""
import sys, time
from torch.utils.cpp_extension import load_inline
source = '''
#include <torch/library.h>
#include <ATen/ATen.h>
at::Tensor twice(const at::Tensor& x) { return x * 2; }
TORCH_LIBRARY(native_build_probe, m) { m.def("twice(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(native_build_probe, CPU, m) { m.impl("twice", &twice); }
'''
t = time.perf_counter()
load_inline("native_build_probe", cpp_sources=[source], is_python_module=False, build_directory=sys.argv[1],
            extra_cflags=["-O3", "-march=native"])
print(time.perf_counter() - t)
"""


def _seconds(code: str, env: dict, *args: str) -> float:
    """Seconds the snippet reports, run in a fresh process (the Python imports left out of the time)."""
    done = subprocess.run(
        [sys.executable, "-c", "import torch\n" + code, *args], env=env, capture_output=True, text=True, check=True
    )
    return round(float(done.stdout.strip().splitlines()[-1]), 3)


def main() -> None:
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as build:
        env = {**os.environ, "SPARSETRAIN_CACHE": cache}
        record = {
            "benchmark": "native_build",
            "plain_c_first_s": _seconds(OURS, env),
            "plain_c_warm_s": _seconds(OURS, env),
            "cpp_extension_first_s": _seconds(CPP_EXTENSION, env, build),
            "cpp_extension_warm_s": _seconds(CPP_EXTENSION, env, build),
            "command": command_line(),
            "commit": commit(),
            **environment(),
        }
    print(json.dumps(record))
    (RESULTS / "native_build.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
