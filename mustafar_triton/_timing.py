"""GPU time of a call, cold L2, without the host's share: how the tuner and perf/ time kernels.

`triton.testing.do_bench` records events around each call from the host. When the host needs
longer to issue a call than the GPU needs to run the previous flush and call (measured at B=1
T=32768: ~67 us of GPU work per decode call, 151-207 us by do_bench; perf/NOTES.md), the GPU
waits inside the timed interval and the time is the host's, varying with the host's load. Here
the calls are replayed from CUDA graphs instead, so the GPU never waits on the host:

  graph A: `calls` x (L2 flush, fn)     graph B: `calls` x (L2 flush)
  time per call = (replay time of A - replay time of B) / calls, median over interleaved rounds.

The flush (a 256 MB memset, as do_bench's) runs before every call because a decode step finds
its layer's cache evicted by the other layers; without it, caches up to the H100's 50 MB L2 would
look faster than they are in a model.
"""
from __future__ import annotations

import statistics

import torch

FLUSH_BYTES = 256 << 20


def gpu_time_ms(fn, calls: int = 10, rounds: int = 7, flush_l2: bool = True) -> float:
    """Median GPU milliseconds of one call of fn, L2 flushed before each call (flush_l2=False:
    back to back, warm L2, for diagnostics). fn must be callable repeatedly, already compiled, and
    capturable in a CUDA graph (no host syncs: the capture raises otherwise). Host work inside fn
    runs once, at capture, and is not timed."""
    device = torch.device("cuda", torch.cuda.current_device())
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device) if flush_l2 else None
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm up on a side stream, as torch's graph docs ask
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    with_fn, flush_only = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(with_fn):
        for _ in range(calls):
            if flush_l2:
                flush.zero_()
            fn()
    if flush_l2:
        with torch.cuda.graph(flush_only):
            for _ in range(calls):
                flush.zero_()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def replay_ms(graph) -> float:
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def flush_ms() -> float:
        return replay_ms(flush_only) if flush_l2 else 0.0

    replay_ms(with_fn)  # first replays upload the graphs
    flush_ms()
    per_call = [(replay_ms(with_fn) - flush_ms()) / calls for _ in range(rounds)]
    return max(statistics.median(per_call), 0.0)
