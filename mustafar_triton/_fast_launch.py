"""Launching a compiled kernel again without the JIT's per-call work.

`kernel[grid](*args, **kwargs)` binds the arguments, computes their specialization (each int's
value class, each pointer's 16-byte alignment), hashes it and looks the compiled kernel up, every
call: most of the host time of a small decode step (perf/NOTES.md, 2026-12-03). A
`CompiledLauncher` makes the first launch that way, keeps the compiled kernel's launcher for the
grid, and sends later launches straight to it, as long as every tensor argument keeps the address
alignment the first call had (a different one takes the JIT path again, which compiles or finds
that specialization). The keyword arguments given to the constructor (ints, constexprs, options)
are bound once; the caller guarantees that everything else (shapes, dtypes, strides, grid) is the
same at every call: decode's _Launch is per argument layout.
"""
from __future__ import annotations

import torch


class CompiledLauncher:
    """fn[grid](*args, **per_call, **constants) with the JIT's binding done once (module docstring).

    fresh: names of tensor parameters the caller allocates itself with torch (their addresses are
    always 16-byte aligned), so their alignment is not checked per call."""

    def __init__(self, fn, grid: tuple, fresh: tuple[str, ...] = (), **constants):
        self.fn, self.grid, self.fresh, self.constants = fn, grid, frozenset(fresh), constants
        self.runner = None      # the compiled kernel's launcher for `grid`
        self.tensors = ()       # the positions of the tensor parameters whose alignment is checked
        self.alignment = None   # their 16-byte alignment the kernel was compiled for
        self.tail = None        # the parameters after the positional ones: (name, per call?, value)
        self.fixed_tail = None  # their values, where none is given per call (one tuple, no generator)

    def __call__(self, stream: int, *args, **per_call) -> None:
        """stream: the raw CUDA stream (torch._C._cuda_getCurrentRawStream), read once by the caller."""
        if self.runner is not None:
            full = args + (self.fixed_tail if self.fixed_tail is not None else
                           tuple(per_call[name] if live else value for name, live, value in self.tail))
            if self._same_alignment(full):
                self.runner(*full, stream=stream)
                return
        compiled = self.fn[self.grid](*args, **per_call, **self.constants)
        self._keep(compiled, args, per_call)

    def _keep(self, compiled, args, per_call) -> None:
        """Keep the compiled kernel's launcher; not for stand-ins (perf/host_cost.py's stubs, the
        launch counters of tests/test_gpu_fuzz.py, perf/decode_gathers.py's baseline adapter): those
        without a JIT function's params, or that return no compiled kernel, always run as called."""
        if compiled is None or not hasattr(compiled, "packed_metadata") or not hasattr(self.fn, "params"):
            return
        params = self.fn.params
        self.tail = tuple((p.name, p.name in per_call, self.constants.get(p.name, p.default))
                          for p in params[len(args):])
        full = args + tuple(per_call[name] if live else value for name, live, value in self.tail)
        self.fixed_tail = None if per_call else full[len(args):]
        self.tensors = tuple(i for i, a in enumerate(full)
                             if isinstance(a, torch.Tensor) and params[i].name not in self.fresh)
        self.alignment = tuple(full[i].data_ptr() % 16 == 0 for i in self.tensors)
        self.runner = compiled[tuple(self.grid) + (1,) * (3 - len(self.grid))]  # it reads all three

    def _same_alignment(self, full: tuple) -> bool:
        """Every checked tensor parameter 16-byte aligned as at the first launch. The usual case, all
        of them aligned, is one OR over the addresses (a host-time saving of a few us per launch)."""
        if all(self.alignment):
            bits = 0
            for i in self.tensors:
                bits |= full[i].data_ptr()
            return bits % 16 == 0
        return tuple(full[i].data_ptr() % 16 == 0 for i in self.tensors) == self.alignment
