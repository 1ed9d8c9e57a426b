"""The test harness itself: the interpreter's out-of-bounds guard and the poisoned allocations."""
import pytest
import torch
import triton
import triton.language as tl

import mustafar_triton
import mustafar_triton.attention
import mustafar_triton.compress
from conftest import INTERPRETING, OOB_GUARD, OutOfBoundsAccess  # noqa: F401
from mt_testutils import randn


@triton.jit
def _copy_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    if MASKED:
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n, other=0.0), mask=offs < n)
    else:
        tl.store(out_ptr + offs, tl.load(x_ptr + offs))


@triton.jit
def _store_past_kernel(out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + n + offs, tl.zeros([BLOCK], tl.float32))  # writes [n, n + BLOCK): past the end


@triton.jit
def _masked_scalar_kernel(x_ptr, out_ptr, idx):
    # scalar load through a pointer computed from a runtime index
    tl.store(out_ptr, tl.load(x_ptr + idx))


def test_guard_passes_masked_in_bounds_kernel(oob_guard, device):
    storage = randn(32, torch.float32, 1, device)
    x = storage[:8]                     # a view: the storage continues past it
    out = torch.full((16,), -1.0, device=device)
    before = oob_guard.checked
    _copy_kernel[(1,)](x, out, 8, BLOCK=16, MASKED=True)
    assert oob_guard.checked > before, "the guard saw no memory op"
    assert torch.equal(out[:8], x) and torch.all(out[8:] == -1.0)


def test_guard_catches_out_of_bounds_load(oob_guard, device):
    # Reads x[8:16], which lies inside the storage (so no segfault without the guard) but past the
    # tensor argument: the guard must fail the launch.
    storage = randn(32, torch.float32, 2, device)
    x = storage[:8]
    out = torch.zeros(16, device=device)
    with pytest.raises(Exception, match="out of bounds load") as info:
        _copy_kernel[(1,)](x, out, 8, BLOCK=16, MASKED=False)
    assert "8 of 16 active lanes" in str(info.value)


def test_guard_catches_out_of_bounds_store(oob_guard, device):
    storage = torch.zeros(64, device=device)
    out = storage[:16]
    with pytest.raises(Exception, match="out of bounds store"):
        _store_past_kernel[(1,)](out, 16, BLOCK=16)
    assert torch.all(storage[16:32] == 0), "the bad store must not have happened"


def test_guard_catches_scalar_load_past_end(oob_guard, device):
    x = randn(4, torch.float32, 3, device)
    out = torch.zeros(1, device=device)
    _masked_scalar_kernel[(1,)](x, out, 3)
    assert out.item() == x[3].item()
    with pytest.raises(Exception, match="out of bounds load"):
        _masked_scalar_kernel[(1,)](x, out, 4)


def test_guard_can_be_switched_off_and_on(oob_guard, device):
    """Proves that the guard (not the interpreter) is what raises."""
    storage = randn(32, torch.float32, 4, device)
    x = storage[:8]
    out = torch.zeros(16, device=device)
    oob_guard.enabled = False
    try:
        _copy_kernel[(1,)](x, out, 8, BLOCK=16, MASKED=False)  # silently reads the neighbour
    finally:
        oob_guard.enabled = True
    assert torch.equal(out, storage[:16])
    with pytest.raises(Exception, match="out of bounds"):
        _copy_kernel[(1,)](x, out, 8, BLOCK=16, MASKED=False)


def test_guard_is_live_during_library_calls(oob_guard, device):
    x = randn((1, 1, 5, 64), torch.float16, 5, device)
    before = oob_guard.checked
    mustafar_triton.prune_and_pack(x, 0.5)
    assert oob_guard.checked > before


@pytest.mark.parametrize("module", [mustafar_triton.compress, mustafar_triton.attention])
def test_library_allocations_are_poisoned(module):
    t = module.torch.empty((3, 4), dtype=torch.float16)
    assert torch.isnan(t).all()
    i = module.torch.empty(5, dtype=torch.int32)
    assert torch.all(i == 0x5A5A5A5A)
    like = module.torch.empty_like(torch.zeros(2, 2, dtype=torch.bfloat16))
    assert torch.isnan(like).all()
    assert module.torch.float16 is torch.float16 and module.torch.Tensor is torch.Tensor


def test_device_switch(device):
    assert device.type in ("cpu", "cuda")
    assert mustafar_triton._runtime.interpreting() == (device.type == "cpu") == INTERPRETING


def test_remember_drops_the_oldest_entry_at_its_limit():
    """The per-layout caches (decode plans, the cache's launches) stay bounded: at the limit the
    entry stored first goes, the others and the new one stay."""
    from mustafar_triton._runtime import remember
    cache = {}
    for i in range(3):
        assert remember(cache, ("layout", i), i * 10, limit=3) == i * 10
    remember(cache, ("layout", 3), 30, limit=3)
    assert list(cache) == [("layout", 1), ("layout", 2), ("layout", 3)] and cache[("layout", 3)] == 30
