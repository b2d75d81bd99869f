"""keep_freed_memory: a freed large tensor's pages serve the next one (no page faults), process-wide; the Trainer
turns it on unless run.keep_freed_memory=false. Each case runs in a fresh process: the setting is the process's."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

import sparsetrain as st
from sparsetrain.execution import allocator

FAULTS = """
import resource, sys, torch
from sparsetrain.execution.allocator import freed_memory_kept, keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def faults_of_64_mib_tensors(count):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(count):
        t = torch.empty(16 * 2**20)
        t.fill_(1.0)
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
# the first ones fault their pages in either way (the heap may grow twice: a freed block a few bytes short of an
# aligned request is passed over), as a training loop's first steps do
faults_of_64_mib_tensors(3)
print(kept, freed_memory_kept(), faults_of_64_mib_tensors(5))
"""

TRAINER = """
import sys
from sparsetrain.app import Trainer
from sparsetrain.app.config import load_config
from sparsetrain.execution.allocator import freed_memory_kept
cfg = load_config(overrides=["model.name=small_cnn", "data.dataset=mnist", f"data.data_dir={sys.argv[1]}",
                             f"run.out_dir={sys.argv[2]}", *sys.argv[3:]])
Trainer(cfg)
print(freed_memory_kept())
"""


def _child(code: str, *args: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_a_freed_tensor_serves_the_next_one_without_page_faults():
    kept, said, faults = _child(FAULTS, "keep")
    assert kept == said == "True"
    assert int(faults) < 1024, f"{faults} page faults for 5 x 16,384 pages already held"
    _, said, _ = _child(FAULTS, "default")
    assert said == "False"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_the_trainer_keeps_freed_memory_unless_told_not_to(tmp_path, tiny_mnist_tar):
    assert _child(TRAINER, str(tiny_mnist_tar), str(tmp_path / "a")) == ["True"]
    assert _child(TRAINER, str(tiny_mnist_tar), str(tmp_path / "b"), "run.keep_freed_memory=false") == ["False"]


def test_under_another_c_library_nothing_changes_and_it_says_so(monkeypatch):
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(allocator, "_state", {"kept": False})  # (a Trainer built earlier in this process set it)
    assert st.keep_freed_memory() is False
    assert allocator.freed_memory_kept() is False
