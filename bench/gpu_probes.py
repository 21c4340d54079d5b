"""What `bench/gpu_engine.py` reads beside its timings: the graph the engine replayed most,
replayed alone (its time, its kernels), py-spy stacks of the process while it decodes, and
recorded steps against the eager runner (`graph_check`). Each works on the CPU too (a dry
run), where the "replay" re-runs the recorded Python and the kernels are not read.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def busiest_graph(runner: Any, batch: int, adapters: bool) -> Any:
    """The graph for `batch` rows (with or without adapter kernels) the engine replayed
    most: the width the timed decode ran at (a wider one, recorded for a long prompt,
    would time attention over more padding than those steps read). None if none."""
    graphs = [
        g for k, g in getattr(runner, "graphs", {}).items() if k[0] == batch and k[2] == adapters
    ]
    return max(graphs, key=lambda g: g.replays, default=None)


def replay_ms(runner: Any, batch: int, adapters: bool, reps: int = 20) -> float | None:
    """Milliseconds of one replay of `busiest_graph`, alone: the device time of a graphed
    decode step, against which the engine's whole step shows its host time. None if no
    such graph. The replay reads the buffers as the engine's last step left them."""
    graph = busiest_graph(runner, batch, adapters)
    if graph is None:
        return None
    replay = graph.replay
    cuda = torch.cuda.is_available()
    for _ in range(3):
        replay()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        replay()
    if cuda:
        torch.cuda.synchronize()
    return round(1000 * (time.perf_counter() - start) / reps, 3)


def profile(work: Callable[[], object], out: Path, seconds: int) -> dict[str, Any]:
    """py-spy records this process for `seconds` (every thread, raw folded stacks, 200
    samples a second) into `out` while `work` (a decode run) runs over and over."""
    spy = shutil.which("py-spy")
    if spy is None:
        return {"error": "py-spy is not on PATH"}
    cmd = [spy, "record", "-p", str(os.getpid()), "-d", str(seconds), "-r", "200",
           "--threads", "-f", "raw", "-o", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs = 0
    while proc.poll() is None and runs < 200:
        work()
        runs += 1
    log, _ = proc.communicate(timeout=60)
    return {"file": out.name, "decode_runs": runs, "rc": proc.returncode, "log": log[-400:]}


def replay_kernels(runner: Any, batch: int, adapters: bool, reps: int = 5) -> dict | None:
    """The kernels of one replay of the graph `replay_ms` times (torch.profiler, CUDA
    only): how many, the GPU time of their sum, and each kernel name's time and launches,
    longest first, per replay (all of them: the K graph's fused kernels against the base
    graph's plain ones are the comparison that says what the adapters cost)."""
    graph = busiest_graph(runner, batch, adapters)
    if graph is None or not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    replay = graph.replay
    replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            replay()
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda e: -e.device_time_total)
    return {
        "kernels": round(sum(e.count for e in rows) / reps, 1),
        "device_us": round(sum(e.device_time_total for e in rows) / reps, 1),
        "top_us": [
            [e.key[:80], round(e.device_time_total / reps, 1), round(e.count / reps, 1)]
            for e in rows
        ],
    }


def graph_check(model: Any, adapters: dict[str, Any], device: str, dry: bool) -> dict[str, Any]:
    """Recorded steps against the eager runner on `device`, in float32 on the first two
    layers' shapes: three prefills, then decode of three sequences (two adapters and a base
    row, so the bucket of 4 pads one row) with a new prompt's chunk packed into one step,
    an adapter loaded into a new slot between replays, a merge; returns the
    largest logits error relative to the logits' scale, and whether it is within 1e-3.
    `model` (the float32 model before any wrapping) is cut to its first two layers here."""
    from flora.serving import ServingModel
    from flora.serving.factors import modules_from_adapter
    from flora_server.engine.paged.capture import CudaGraphCapture, RecordedCapture
    from flora_server.engine.paged.fused import fused_kernels
    from flora_server.engine.paged.graphs import GraphedPagedRunner
    from flora_server.engine.paged.runner import ChunkInput, KVTensors, PagedRunner

    small = model.float()
    small.model.layers = small.model.layers[:2]
    small.config.num_hidden_layers = 2
    small = small.to(device)
    serving = ServingModel(small, max_slots=4)
    kept = {name for name, _ in small.named_modules()}

    def load(slot: int, adapter: Any) -> None:  # the adapter's modules in the kept layers
        modules = modules_from_adapter(adapter)
        serving.load_modules(slot, {n: m for n, m in modules.items() if n in kept})

    names = list(adapters)
    load(0, adapters[names[0]])
    load(1, adapters[names[1 % len(names)]])
    c, blocks, bs = small.config, 64, 16

    def kv(n: int) -> KVTensors:
        head_dim = c.hidden_size // c.num_attention_heads
        return KVTensors(2, n, bs, c.num_key_value_heads, head_dim, torch.float32, device)

    capture = RecordedCapture() if dry else CudaGraphCapture(torch.device(device))
    fused = fused_kernels(torch.device(device), torch.float32)  # as the engine takes them
    eager = PagedRunner(small, kv(blocks))
    graphed = GraphedPagedRunner(
        small, kv(blocks + 1), serving, capture, scratch_block=blocks, fused=fused
    )
    rng = random.Random(3)
    seqs = [([rng.randrange(3, c.vocab_size) for _ in range(n)], [i * 8 + j for j in range(8)], s)
            for i, (n, s) in enumerate([(20, 0), (5, None), (33, 1)])]  # fmt: skip
    worst = 0.0

    def both(chunks: list, slots: list, sample: list) -> torch.Tensor:
        nonlocal worst
        want = eager.run(chunks, slots, sample, serving.set_routing)
        got = graphed.run(chunks, slots, sample, serving.set_routing)
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
        return want

    for tokens, table, slot in seqs:
        logits = both([ChunkInput(tokens, 0, table)], [slot] * len(tokens), [len(tokens) - 1])
        tokens.append(int(logits.argmax(-1)))
    for step in range(12):
        if step == 4:  # a load between replays: read in place
            load(2, adapters[names[-1]])
            seqs[1] = (seqs[1][0], seqs[1][1], 2)
        live = seqs if step < 8 else seqs[:1]
        if step == 8:
            serving.merge(0)  # one row on the merged slot: the base graph
        chunks = [ChunkInput(t[-1:], len(t) - 1, table) for t, table, _ in live]
        slots = [s for _, _, s in live]
        sample = list(range(len(live)))
        if step == 6:  # a new prompt's chunk packed with the decode rows, with an adapter
            fresh = [rng.randrange(3, c.vocab_size) for _ in range(9)]
            chunks.append(ChunkInput(fresh, 0, [24 + j for j in range(8)]))
            slots += [0] * len(fresh)
        logits = both(chunks, slots, sample)
        for (t, _, _), token in zip(live, logits.argmax(-1).tolist(), strict=True):
            t.append(token)
    serving.unwrap()
    replays = len(seqs) + 12  # the prefills, then the decode (one step with a prefill chunk)
    return {
        "graph_check_max_rel_err": worst,
        "graph_check_replays": graphed.replays,
        "graph_check_ok": bool(worst < 1e-3 and graphed.replays == replays),
    }
