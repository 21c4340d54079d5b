"""How a step's forward is recorded and replayed (`GraphedPagedRunner`'s injected
`GraphCapture`): `CudaGraphCapture` on a CUDA device, every graph allocating from one
shared memory pool; `RecordedCapture` on the CPU, which re-runs the recorded Python on
replay against the same buffers, so the tests and `bench/gpu_engine.py --dry-run` run
everything but the CUDA call itself. `graph_capture_for` reads the `cuda_graphs` setting
behind the capability check `cuda_graphs_work`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)


class GraphCapture(Protocol):
    """Records a forward that reads and writes only tensors outliving it."""

    def capture(self, forward: Callable[[], None]) -> Callable[[], None]:
        """Record `forward`; returns what replays it (and keeps `forward` alive with it)."""
        ...

    def reset(self) -> None:
        """Every graph recorded so far has been dropped (the runner's graphs were cleared)."""
        ...


@dataclass(frozen=True)
class _CudaReplay:
    """A recorded graph with the forward it recorded. A graph reads and writes raw device
    addresses: the tensors the forward's closure holds (index buffers, masks, the step's
    view of the pool) must live as long as the graph, or the caching allocator hands their
    memory to other tensors and a replay reads whatever is there."""

    graph: torch.cuda.CUDAGraph
    forward: Callable[[], None]

    def __call__(self) -> None:
        self.graph.replay()


class CudaGraphCapture:
    """`torch.cuda.CUDAGraph`, every graph allocating from one shared memory pool (their
    intermediates are dead between replays and only one replays at a time)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.captures = 0  # graphs recorded
        self._pool: Any = None
        self._stream = torch.cuda.Stream(device)

    def capture(self, forward: Callable[[], None]) -> Callable[[], None]:
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            for _ in range(2):  # lazy initialisation (cuBLAS workspaces, Triton compiles)
                forward()
        current.wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: only this (the worker) thread's calls must be capture-safe.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            forward()
        if self._pool is None:
            self._pool = graph.pool()
        self.captures += 1
        return _CudaReplay(graph, forward)

    def reset(self) -> None:
        # The shared pool dies with the last graph that used it; recording into its id
        # afterwards fails inside the allocator, so the next graph starts a new pool.
        self._pool = None


class RecordedCapture:
    """The CPU stand-in: `capture` runs the forward once (as the CUDA warm-up does) and
    replay runs it again, reading the same buffers. `captures` counts recordings."""

    def __init__(self) -> None:
        self.captures = 0

    def capture(self, forward: Callable[[], None]) -> Callable[[], None]:
        self.captures += 1
        forward()
        return forward

    def reset(self) -> None:
        pass


@functools.cache
def cuda_graphs_work(device: torch.device) -> bool:
    """The capability check: a CUDA device on which a recorded kernel replays with the
    buffer's current contents (False on the CPU, or where recording fails)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        x = torch.zeros(4, device=device)

        def add_one() -> None:
            x.add_(1.0)

        replay = CudaGraphCapture(device).capture(add_one)
        x.fill_(10.0)
        replay()
        torch.cuda.synchronize(device)
        return bool((x == 11.0).all())
    except Exception as exc:  # a driver or runtime without graph support
        log.warning("CUDA graphs disabled on %s: %s", device, exc)
        return False


def graph_capture_for(setting: str, device: torch.device) -> GraphCapture | None:
    """The setting `cuda_graphs` ("auto" | "off") for a model on `device`: auto records
    step graphs on CUDA where `cuda_graphs_work`, else the runner stays eager."""
    if setting not in ("auto", "off"):
        raise ValueError(f"cuda_graphs must be 'auto' or 'off', not {setting!r}")
    if setting == "auto" and cuda_graphs_work(device):
        return CudaGraphCapture(device)
    return None
