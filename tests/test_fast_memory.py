"""wmlib.fast.memory: the allocator setting keeps a freed large buffer for reuse; `import wmlib` leaves
the allocator alone, and the `wm` command applies the setting before anything else."""

import os
import platform
import resource
import subprocess
import sys

import pytest

FAULTS_OF_A_SECOND_BUFFER = """
import ctypes, resource, sys
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "import":
    import wmlib, wmlib.env, wmlib.vae  # noqa: F401, E401  (the library, as a notebook imports it)
if sys.argv[1] == "reuse":
    from wmlib.fast.memory import reuse_freed_memory
    reuse_freed_memory()
def faults_of_a_64mb_buffer():  # as XLA's scratch buffers: malloc, fill, free
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(64 * 2**20)
    ctypes.memset(p, 1, 64 * 2**20)
    libc.free(p)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
def in_a_thread(f):  # as XLA: its worker threads allocate
    import threading
    out = []
    t = threading.Thread(target=lambda: out.append(f()))
    t.start()
    t.join()
    return out[0]
in_a_thread(faults_of_a_64mb_buffer)
print(in_a_thread(faults_of_a_64mb_buffer))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="wmlib.fast.memory only acts on glibc")
def test_reuse_freed_memory_removes_the_page_faults_of_a_repeated_large_buffer():
    def faults(mode, **env):
        out = subprocess.run([sys.executable, "-c", FAULTS_OF_A_SECOND_BUFFER, mode], capture_output=True,
                             text=True, check=True, env={**os.environ, **env}).stdout
        return int(out)

    pages = 64 * 2**20 // resource.getpagesize()
    assert faults("default") > pages // 2  # glibc returned the block: every page is new again
    assert faults("reuse") < pages // 20  # the freed block was kept and reused
    assert faults("import") > pages // 2  # importing the library changes nothing
    assert faults("reuse", WM_MALLOC="default") > pages // 2  # the opt-out


def test_wm_applies_it_first(monkeypatch):
    from wmlib import cli
    from wmlib.fast import memory

    class Applied(Exception):
        pass

    def applied():
        raise Applied

    monkeypatch.setattr(memory, "reuse_freed_memory", applied)
    with pytest.raises(Applied):
        cli.main(["evaluate", "--help"])
