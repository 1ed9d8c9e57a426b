"""_timing.gpu_time_ms, the timer of the tuner and of perf/ (GPU only: it replays CUDA graphs)."""
import time

import pytest
import torch

from mustafar_triton._timing import gpu_time_ms


@pytest.mark.cuda_only
def test_gpu_time_scales_with_the_work(device):
    """Copying 4x the bytes takes about 4x the time (the flush, subtracted, does not count: the
    256 MB flush left in would add ~0.1 ms to both, estimated, and pull the ratio to ~2.3 on an
    H100). The upper bound leaves room for the GPU suite's 8 workers, which share the GPU: 5.1 was
    seen there (e65bb90, H100: 0.046 / 0.235 ms)."""
    small_src, big_src = torch.randn(1 << 24, device=device), torch.randn(1 << 26, device=device)
    small_dst, big_dst = torch.empty_like(small_src), torch.empty_like(big_src)
    small = gpu_time_ms(lambda: small_dst.copy_(small_src))
    big = gpu_time_ms(lambda: big_dst.copy_(big_src))
    assert small > 0
    assert 3.0 < big / small < 6.0, (small, big)


@pytest.mark.cuda_only
def test_gpu_time_excludes_the_host(device):
    """A call that keeps the host busy for 2 ms around a ~10 us kernel times as the kernel: the
    case do_bench gets wrong when the host is slower than the GPU."""
    x = torch.randn(1 << 20, device=device)

    def slow_host_fast_gpu():
        time.sleep(0.002)
        x.mul_(1.0)
    assert gpu_time_ms(slow_host_fast_gpu) < 0.2


@pytest.mark.cuda_only
def test_gpu_time_warm_l2_is_faster_for_a_cache_sized_copy(device):
    """Without the flush (flush_l2=False) a 16 MB copy runs out of the 50 MB L2 and is faster."""
    src = torch.randn(1 << 22, device=device)
    dst = torch.empty_like(src)
    cold = gpu_time_ms(lambda: dst.copy_(src))
    warm = gpu_time_ms(lambda: dst.copy_(src), flush_l2=False)
    assert 0 < warm < cold, (warm, cold)


@pytest.mark.cuda_only
def test_gpu_time_refuses_a_host_sync(device):
    """A call that syncs with the host cannot be timed this way: the capture raises."""
    x = torch.randn(16, device=device)
    with pytest.raises(RuntimeError):
        gpu_time_ms(lambda: x.sum().item())
