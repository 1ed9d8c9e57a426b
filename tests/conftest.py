"""Test setup for mustafar_triton.

ONE switch selects where kernels run:

    MUSTAFAR_TEST_DEVICE=cpu   (default) Triton CPU interpreter, TRITON_INTERPRET=1
    MUSTAFAR_TEST_DEVICE=cuda  the GPU, compiled kernels (no interpreter)

Under the interpreter an out-of-bounds guard checks every active (unmasked) pointer lane of every
load / store / atomic against the byte spans of the tensor arguments of the launch; a lane outside
all of them raises `OutOfBoundsAccess` (the interpreter re-raises it as an InterpreterError), so
the test fails instead of reading garbage or corrupting a neighbour silently.

Every test also runs with the library's allocations poisoned (`torch.empty` / `torch.empty_like`
inside mustafar_triton.compress and mustafar_triton.attention return NaN for floats and
0x5A5A5A5A... for ints), so an output element the kernels forget to write shows up as a mismatch
against the reference.
"""
# The interpreter switch must be set before torch / triton are imported (triton reads it when
# kernels are defined), so this block comes first.
import os

DEVICE_NAME = os.environ.get("MUSTAFAR_TEST_DEVICE", "cpu").strip().lower()
if DEVICE_NAME not in ("cpu", "cuda"):
    raise RuntimeError(f"MUSTAFAR_TEST_DEVICE must be 'cpu' or 'cuda', got {DEVICE_NAME!r}")
if DEVICE_NAME == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)
    # No on-the-fly tuning of every test shape on the GPU (slow, writes ~/.cache); set
    # MUSTAFAR_TRITON_AUTOTUNE=1 to run the suite with tuned configs. test_decode.py runs the
    # decode config space explicitly.
    os.environ.setdefault("MUSTAFAR_TRITON_AUTOTUNE", "0")

import sys  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

INTERPRETING = DEVICE_NAME == "cpu"
DEVICE = torch.device(DEVICE_NAME)

settings.register_profile(
    "mustafar", deadline=None, max_examples=20, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("mustafar")


def pytest_configure(config):
    # triton 3.6's interpreter converts 1-element arrays to scalars (deprecated in numpy >= 1.25)
    config.addinivalue_line("filterwarnings",
                            "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")
    config.addinivalue_line("markers", "cuda_only: needs a GPU (MUSTAFAR_TEST_DEVICE=cuda)")
    config.addinivalue_line("markers", "interpreter_only: needs the Triton CPU interpreter")
    if DEVICE_NAME == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("MUSTAFAR_TEST_DEVICE=cuda but torch sees no CUDA device")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cuda_only" in item.keywords and INTERPRETING:
            item.add_marker(pytest.mark.skip(reason="GPU only (set MUSTAFAR_TEST_DEVICE=cuda)"))
        if "interpreter_only" in item.keywords and not INTERPRETING:
            item.add_marker(pytest.mark.skip(reason="Triton CPU interpreter only"))


def pytest_report_header(config):
    return f"mustafar_triton tests on {DEVICE_NAME} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})"


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device every test puts its tensors on (see MUSTAFAR_TEST_DEVICE)."""
    return DEVICE


# --------------------------------------------------------------------------------------------
# Out-of-bounds guard for the interpreter
# --------------------------------------------------------------------------------------------
class OutOfBoundsAccess(RuntimeError):
    """An active pointer lane of a load/store lies outside every tensor argument of the launch."""


class _OOBGuard:
    def __init__(self):
        self.enabled = False
        self.installed = False
        self.spans = None      # np.uint64 [n, 2] byte spans [lo, hi) of the current launch
        self.checked = 0       # memory ops checked (lets a test prove the guard is live)
        self._originals = {}

    # -- spans of the tensor arguments of a launch -------------------------------------------
    @staticmethod
    def _collect(arg, out):
        from triton.tools.tensor_descriptor import TensorDescriptor
        if isinstance(arg, (tuple, list)):
            for a in arg:
                _OOBGuard._collect(a, out)
        elif isinstance(arg, TensorDescriptor):
            _OOBGuard._collect(arg.base, out)
        elif hasattr(arg, "data_ptr"):
            t = arg.base if isinstance(arg, triton.runtime.jit.TensorWrapper) else arg
            if t.numel() == 0:
                return
            es = t.element_size()
            lo_el = sum(min(0, (s - 1) * st) for s, st in zip(t.shape, t.stride()))
            hi_el = sum(max(0, (s - 1) * st) for s, st in zip(t.shape, t.stride())) + 1
            base = t.data_ptr()
            out.append((base + lo_el * es, base + hi_el * es))

    def _set_spans(self, args_hst, kwargs_hst):
        spans = []
        self._collect(list(args_hst), spans)
        self._collect(list(kwargs_hst.values()), spans)
        self.spans = np.array(spans, dtype=np.uint64).reshape(-1, 2)

    # -- the check ----------------------------------------------------------------------------
    def check(self, kind, ptrs, mask):
        if not self.enabled or self.spans is None:
            return
        self.checked += 1
        addr = np.asarray(ptrs.data)
        if mask is not None:
            m = np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)
            addr = addr[m]
        addr = addr.reshape(-1).astype(np.uint64)
        if addr.size == 0:
            return
        elt = ptrs.get_element_ty()
        nbytes = np.uint64(max(1, elt.primitive_bitwidth // 8))
        ok = np.zeros(addr.shape, dtype=bool)
        end = addr + nbytes
        for lo, hi in self.spans:
            ok |= (addr >= lo) & (end <= hi)
        if not ok.all():
            bad = addr[~ok]
            spans = ", ".join(f"[{int(lo):#x}, {int(hi):#x})" for lo, hi in self.spans)
            raise OutOfBoundsAccess(
                f"out of bounds {kind}: {bad.size} of {addr.size} active lanes ({elt}) outside every "
                f"tensor argument; first bad address {int(bad[0]):#x}; argument spans: {spans or 'none'}")

    # -- installation -------------------------------------------------------------------------
    def install(self):
        if self.installed:
            return
        from triton.runtime import interpreter as interp
        guard = self
        GE, IB = interp.GridExecutor, interp.InterpreterBuilder
        self._originals = {
            (GE, "_init_args_hst"): GE._init_args_hst,
            (GE, "__call__"): GE.__call__,
            (IB, "create_masked_load"): IB.create_masked_load,
            (IB, "create_masked_store"): IB.create_masked_store,
            (IB, "create_atomic_rmw"): IB.create_atomic_rmw,
            (IB, "create_atomic_cas"): IB.create_atomic_cas,
        }
        o = {name: fn for (_, name), fn in self._originals.items()}

        def _init_args_hst(self_, args_dev, kwargs):
            args_hst, kwargs_hst = o["_init_args_hst"](self_, args_dev, kwargs)
            guard._set_spans(args_hst, kwargs_hst)
            return args_hst, kwargs_hst

        def __call__(self_, *args, **kwargs):
            try:
                return o["__call__"](self_, *args, **kwargs)
            finally:
                guard.spans = None

        def create_masked_load(self_, ptrs, mask, other, *a, **k):
            guard.check("load", ptrs, mask)
            return o["create_masked_load"](self_, ptrs, mask, other, *a, **k)

        def create_masked_store(self_, ptrs, value, mask, *a, **k):
            guard.check("store", ptrs, mask)
            return o["create_masked_store"](self_, ptrs, value, mask, *a, **k)

        def create_atomic_rmw(self_, rmwOp, ptr, val, mask, *a, **k):
            guard.check("atomic", ptr, mask)
            return o["create_atomic_rmw"](self_, rmwOp, ptr, val, mask, *a, **k)

        def create_atomic_cas(self_, ptr, cmp, val, *a, **k):
            guard.check("atomic", ptr, None)
            return o["create_atomic_cas"](self_, ptr, cmp, val, *a, **k)

        GE._init_args_hst = _init_args_hst
        GE.__call__ = __call__
        IB.create_masked_load = create_masked_load
        IB.create_masked_store = create_masked_store
        IB.create_atomic_rmw = create_atomic_rmw
        IB.create_atomic_cas = create_atomic_cas
        self.installed = self.enabled = True

    def uninstall(self):
        for (cls, name), fn in self._originals.items():
            setattr(cls, name, fn)
        self._originals = {}
        self.installed = self.enabled = False


OOB_GUARD = _OOBGuard()
if INTERPRETING:
    OOB_GUARD.install()


@pytest.fixture
def oob_guard():
    """The interpreter's out-of-bounds guard (skips the test on the GPU)."""
    if not INTERPRETING:
        pytest.skip("the out-of-bounds guard only exists under the interpreter")
    assert OOB_GUARD.installed and OOB_GUARD.enabled
    return OOB_GUARD


# --------------------------------------------------------------------------------------------
# Poisoned allocations inside the library
# --------------------------------------------------------------------------------------------
_INT_SENTINEL = {
    torch.int64: 0x5A5A5A5A5A5A5A5A, torch.int32: 0x5A5A5A5A, torch.int16: 0x5A5A,
    torch.int8: 0x5A, torch.uint8: 0x5A,
}


def poison_(t: torch.Tensor) -> torch.Tensor:
    if t.numel() == 0:
        return t
    if t.dtype.is_floating_point or t.dtype.is_complex:
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    elif t.dtype in _INT_SENTINEL:
        t.fill_(_INT_SENTINEL[t.dtype])
    return t


class _PoisonedTorch(types.ModuleType):
    """Stands in for `torch` inside a library module: torch.empty/empty_like return poison."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return poison_(torch.empty(*args, **kwargs))

    @staticmethod
    def empty_like(*args, **kwargs):
        return poison_(torch.empty_like(*args, **kwargs))


POISONED_MODULES = ("mustafar_triton.compress", "mustafar_triton.attention")


@pytest.fixture(scope="session", autouse=True)
def poison_library_allocations():
    """Every test runs with torch.empty / empty_like of the library modules poisoned."""
    import mustafar_triton.attention  # noqa: F401
    import mustafar_triton.compress  # noqa: F401
    fake = _PoisonedTorch()
    with pytest.MonkeyPatch.context() as mp:
        for mod in POISONED_MODULES:
            mp.setattr(sys.modules[mod], "torch", fake)
        yield fake
