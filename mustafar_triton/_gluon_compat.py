"""Where the Gluon kernels may run, across triton versions, in one place.

The Gluon kernels (kernels/decode_gluon.py, kernels/prune_pack_gluon.py) are written in Triton's
experimental Gluon dialect, whose API may change between releases. The names they use are the
same, with the same signatures, in triton 3.6, 3.7, 3.8 and 3.9 (checked 2026-12-02: both kernels
compile for sm_90 on each), so no version needs a shim yet; what moved is the register budget
ptxas reaches (tests/test_perf_scripts.py records it per version). A release that moves one of
these names gets its shim here.

`gluon_runs_on(device)` is the one gate: False on the interpreter and CPU tensors (silently: the tl
kernels are the design there), and False with ONE warning where a CUDA device cannot run Gluon:
a triton without these names, a triton version nobody has compiled the kernels with, or a GPU
without mma.sync m16n8k16 (before Ampere). The tl kernels then run: same results, slower.
"""
from __future__ import annotations

import warnings

import torch
import triton

from ._runtime import has_mma_v2

# major.minor of the triton releases both Gluon kernels were compiled with (sm_90, no spill
# beyond tests/test_perf_scripts.py's budget). Only 3.6 has run on a GPU (the GPU machine cannot
# install another); add a version here after its compile tests pass.
GLUON_CHECKED_VERSIONS = ("3.6", "3.7", "3.8", "3.9")

try:
    from triton.experimental import gluon  # noqa: F401  (what the kernels import)
    from triton.experimental.gluon import language as gl  # noqa: F401
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2  # noqa: F401
    GLUON_IMPORT_ERROR: ImportError | None = None
except ImportError as err:  # a triton before Gluon, or one that moved these names
    GluonASTSource = None
    GLUON_IMPORT_ERROR = err


def triton_minor_version(version: str) -> str:
    """'3.9' for '3.9.0', '3.10.1+git1234' -> '3.10'."""
    return ".".join(version.split("+")[0].split(".")[:2])


def gluon_unavailable_reason(version: str | None = None) -> str | None:
    """Why this triton (or `version`) cannot run the Gluon kernels, or None where it can."""
    version = version or triton.__version__
    if GLUON_IMPORT_ERROR is not None:
        return f"triton {version} lacks the Gluon API the kernels use ({GLUON_IMPORT_ERROR})"
    if triton_minor_version(version) not in GLUON_CHECKED_VERSIONS:
        return (f"the Gluon kernels are checked on triton {', '.join(GLUON_CHECKED_VERSIONS)}, "
                f"not on {version}")
    return None


_warned = False


def _warn_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"mustafar_triton: {reason}; using the tl kernels instead (same results, slower)",
                      RuntimeWarning, stacklevel=3)


def gluon_runs_on(device: torch.device) -> bool:
    """True where the Gluon kernels can run on `device` (see the module docstring)."""
    if device.type != "cuda":
        return False
    reason = gluon_unavailable_reason()
    if reason is None and not has_mma_v2(device):
        major, minor = torch.cuda.get_device_capability(device)
        reason = (f"{torch.cuda.get_device_name(device)} (sm_{major}{minor}) has no mma.sync m16n8k16 "
                  "(the Gluon kernels need sm_80 or newer)")
    if reason is not None:
        _warn_once(reason)
        return False
    return True
