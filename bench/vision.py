"""Images/s at batch 16: 16 distinct conv adapters in one batch vs the base alone.

Runs the serving engine's batch forward (`VisionEngine.run_batch`: preprocessing excluded,
per-row conv routing + per-adapter heads included) on EfficientNet-Lite0, interleaving the
base and the mixed batch so both see the same machine load; also compares the two conv
kernels of `flora.serving` (per-adapter segments with merged weights vs one grouped conv
with per-row weights). Prints the ratios and writes bench/results/vision.json.

The adapters are made at the base's input size (``--size`` defaults to it), so base rows
and adapter rows are preprocessed to the same images: an adapter records its own
``image_size`` and the engine resizes its rows to it, so a smaller adapter size would
compare different workloads.

    python bench/vision.py [--size N] [--repeats 5] [--rank 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import flora
from flora import models
from flora.adapter.io import adapter_from_model
from flora.serving.base import ServingPolicy
from flora_server.engine.batch_engine import BatchJob
from flora_server.engine.protocol import InMemorySource
from flora_server.engine.vision import VisionEngine

BATCH = 16


def make_adapters(n: int, rank: int, size: int) -> dict[str, Any]:
    """n conv adapters on every conv of Lite0 with random non-zero cores and a 10-way head."""
    out = {}
    for k in range(n):
        torch.manual_seed(k)
        model = models.load("efficientnet-lite0").model
        model.classifier = torch.nn.Linear(model.classifier.in_features, 10)
        convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
        config = flora.FloraConfig(
            target_modules=convs, rank=rank, kernel_rank=2, train_modules=["classifier"]
        )
        flora.inject(model, config)
        with torch.no_grad():
            for _, layer in flora.adapter_layers(model):
                layer.core.normal_(0.0, 0.01)
        out[f"a{k}"] = adapter_from_model(
            model, "efficientnet-lite0", labels=[str(i) for i in range(10)], image_size=size
        )
    return out


def jobs_for(engine: VisionEngine, adapter_ids: list[str | None], images: list[Any]) -> list:
    loop = asyncio.new_event_loop()
    jobs = []
    for adapter_id, image in zip(adapter_ids, images, strict=True):
        job = BatchJob(adapter_id, [image], 5, loop, loop.create_future())
        job.slot = None if adapter_id is None else engine.cache.lookup(adapter_id)
        jobs.append(job)
    return jobs


def timed(engine: VisionEngine, jobs: list) -> float:
    start = time.perf_counter()
    engine.run_batch(jobs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=None, help="default: the base's size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    if args.size is None:
        args.size = models.load("efficientnet-lite0").preprocessor.size
    torch.manual_seed(0)
    adapters = make_adapters(BATCH, args.rank, args.size)
    from PIL import Image

    images = [
        Image.fromarray((torch.rand(args.size, args.size, 3) * 255).byte().numpy())
        for _ in range(BATCH)
    ]
    policies = {
        "segments": ServingPolicy(conv_segments_max=1 << 30),
        "rows": ServingPolicy(conv_segments_max=0),
    }
    times: dict[str, list[float]] = {"base": []} | {k: [] for k in policies}
    engines = {}
    for name, policy in policies.items():
        loaded = models.load("efficientnet-lite0")
        engine = VisionEngine(loaded, InMemorySource(adapters), max_slots=BATCH, policy=policy)
        # Load every adapter onto a device slot (the cache loads in the background).
        for adapter_id in adapters:
            while engine.cache.lookup(adapter_id) is None:
                time.sleep(0.01)
        engines[name] = engine
    base_ids: list[str | None] = [None] * BATCH
    mixed_ids: list[str | None] = list(adapters)
    with torch.inference_mode():
        for engine in engines.values():  # warm-up (plans, allocator)
            engine.run_batch(jobs_for(engine, mixed_ids, images))
            engine.run_batch(jobs_for(engine, base_ids, images))
        for _ in range(args.repeats):
            times["base"].append(
                timed(engines["segments"], jobs_for(engines["segments"], base_ids, images))
            )
            for name, engine in engines.items():
                times[name].append(timed(engine, jobs_for(engine, mixed_ids, images)))
    ips = {k: BATCH / statistics.median(v) for k, v in times.items()}
    best = max(policies, key=lambda k: ips[k])
    result = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "image_size": args.size,
        "batch": BATCH,
        "distinct_adapters": BATCH,
        "rank": args.rank,
        "images_per_s": ips,
        "ratio_vs_base": {k: ips[k] / ips["base"] for k in policies},
        "best_kernel": best,
        "ratio": ips[best] / ips["base"],
        "goal": 0.8,
    }
    for name in policies:
        print(f"{name:9s}: {ips[name]:8.1f} img/s  ratio {ips[name] / ips['base']:.3f}x base")
    print(f"base     : {ips['base']:8.1f} img/s")
    print(f"ratio (16 distinct conv adapters / base, best kernel {best}): {result['ratio']:.3f}")
    out = Path(__file__).parent / "results" / "vision.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
