"""_fast_launch.CompiledLauncher: the first launch through the JIT, later ones straight to the
compiled kernel's launcher with every parameter in signature order, and back to the JIT when a
tensor's 16-byte alignment changes. A stand-in JIT function records what it gets (no GPU needed;
on a GPU every decode test runs the real path)."""
import inspect
from types import SimpleNamespace

import torch

from mustafar_triton._fast_launch import CompiledLauncher


class FakeCompiled:
    packed_metadata = object()

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        def runner(*args, stream=None):
            self.log.append(("compiled", grid, args, stream))
        return runner


class FakeJIT:
    """fn(x_ptr, n, BLOCK: constexpr, flag=0, LAST: constexpr = 7) as triton.jit exposes it."""

    def __init__(self):
        self.log = []
        sig = inspect.signature(lambda x_ptr, n, BLOCK, flag=0, LAST=7: None)
        self.params = [SimpleNamespace(name=p.name, default=p.default) for p in sig.parameters.values()]

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return FakeCompiled(self.log)
        return run


def test_later_launches_skip_the_jit_until_alignment_changes():
    fn = FakeJIT()
    launch = CompiledLauncher(fn, (1,), BLOCK=16, num_warps=4)   # bound once: a constexpr and an option
    buf = torch.zeros(64)
    launch(1234, buf, 5, flag=1)                 # JIT, compiled kept
    launch(1234, buf, 5, flag=1)                 # straight to the launcher
    launch(1234, buf[1:], 5, flag=1)             # 4-byte offset: JIT again
    kinds = [entry[0] for entry in fn.log]
    assert kinds == ["jit", "compiled", "jit"]
    assert fn.log[0][3] == {"flag": 1, "BLOCK": 16, "num_warps": 4}   # the JIT gets the bound keywords
    _, grid, args, stream = fn.log[1]
    assert grid == (1, 1, 1) and stream == 1234   # the compiled kernel's launcher reads three dims
    assert args == (buf, 5, 16, 1, 7)   # every parameter in signature order, defaults filled in


def test_per_call_keywords_reach_the_launcher_and_bound_ones_stay():
    """A keyword given per call is read at every call (its new value reaches the launcher); the
    constructor's keywords are the same at every call."""
    fn = FakeJIT()
    launch = CompiledLauncher(fn, (3, 2), LAST=9)
    buf = torch.zeros(64)
    for flag in (1, 2, 3):
        launch(0, buf, 5, 8, flag=flag)
    assert [entry[2] for entry in fn.log[1:]] == [(buf, 5, 8, 2, 9), (buf, 5, 8, 3, 9)]
    assert fn.log[1][1] == (3, 2, 1)


def test_fresh_tensors_are_not_checked_for_alignment():
    """Tensors named fresh (the caller allocates them: always aligned) do not take part in the
    alignment check; every other tensor still does."""
    fn = FakeJIT()
    launch = CompiledLauncher(fn, (1,), fresh=("flag",), BLOCK=4)
    buf = torch.zeros(64)
    launch(0, buf, 5, flag=buf)
    launch(0, buf, 5, flag=buf[1:])    # a misaligned fresh tensor: not looked at
    launch(0, buf[1:], 5, flag=buf)    # a misaligned checked tensor: JIT again
    assert [entry[0] for entry in fn.log] == ["jit", "compiled", "jit"]


def test_a_misaligned_first_launch_keeps_its_specialization():
    """A first launch on a tensor off 16-byte alignment: later launches with the same alignment go
    straight to its launcher; an aligned tensor goes back through the JIT, and its launcher then
    serves the next aligned one."""
    fn = FakeJIT()
    launch = CompiledLauncher(fn, (2,), BLOCK=8)
    buf = torch.zeros(64)
    for x in (buf[1:], buf[5:], buf[4:], buf[8:]):   # byte offsets 4, 20, 16 and 32
        launch(7, x, 3)
    assert [entry[0] for entry in fn.log] == ["jit", "compiled", "jit", "compiled"]


def test_stand_ins_are_not_kept():
    """A stub returning nothing, or a wrapper (a launch counter) without the JIT function's params
    that returns the compiled kernel: every launch goes through them."""
    class Stub:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None
    launch = CompiledLauncher(Stub(), (1,))
    launch(0, torch.zeros(4), 1)
    assert launch.runner is None

    jit = FakeJIT()

    class Counter:
        calls = 0

        def __getitem__(self, grid):
            def counted(*args, **kwargs):
                Counter.calls += 1
                return jit[grid](*args, **kwargs)
            return counted
    launch = CompiledLauncher(Counter(), (1,), BLOCK=16)
    for _ in range(3):
        launch(0, torch.zeros(4), 1)
    assert launch.runner is None and Counter.calls == 3
