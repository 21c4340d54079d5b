"""VisionEngine: mixed-adapter batches equal single requests and offline flora inference."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from vision_fixtures import (
    make_conv_adapter,
    make_loaded,
    random_image,
    reference_logits,
)

from flora.models.image_transform import ImageTransform
from flora_server.engine.protocol import AdapterNotFoundError, InMemorySource
from flora_server.engine.vision import (
    PreparedImage,
    VisionEngine,
    adapter_transform,
    image_pixels,
)

TOL = 1e-5


@pytest.fixture(scope="module")
def adapters() -> dict:
    return {
        "a": make_conv_adapter(1, 3),
        "b": make_conv_adapter(2, 5, image_size=24),  # trained at another size
        "c": make_conv_adapter(3, None),  # conv layers only: the base head
    }


async def _start(engine: VisionEngine) -> None:
    engine.start()
    while not engine.ready:
        await asyncio.sleep(0.01)


def _scores(preds: list) -> dict[int, float]:
    return {p.index: p.score for p in preds}


def test_mixed_batch_equals_offline_reference_and_single_requests(adapters: dict) -> None:
    torch.manual_seed(0)
    images = [random_image(i) for i in range(4)]
    plan = [(None, 0), ("a", 1), ("b", 2), ("c", 3), ("a", 0), (None, 3)]

    async def main() -> tuple[list, list, dict]:
        engine = VisionEngine(make_loaded(), InMemorySource(adapters), max_slots=4, max_wait=0.05)
        await _start(engine)
        mixed = await asyncio.gather(*[engine.submit(a, [images[i]], 100) for a, i in plan])
        alone = [await engine.submit(a, [images[i]], 100) for a, i in plan]
        stats = engine.stats()
        await engine.shutdown(1.0)
        return mixed, alone, {"loaded": stats.loaded_adapters}

    mixed, alone, info = asyncio.run(main())
    assert set(info["loaded"]) == {"a", "b", "c"}
    for (adapter_id, i), got, single in zip(plan, mixed, alone, strict=True):
        size = 24 if adapter_id == "b" else 16
        ref = torch.softmax(
            reference_logits(adapters.get(adapter_id), images[i], ImageTransform(size=size)), -1
        )
        # All classes are returned (top_k >= C), best first, with the adapter's label names.
        assert len(got[0]) == ref.numel()
        assert [p.index for p in got[0]] == ref.argsort(descending=True).tolist()
        for index, score in _scores(got[0]).items():
            assert abs(score - ref[index].item()) < TOL
        for index, score in _scores(single[0]).items():
            assert abs(score - _scores(got[0])[index]) < TOL
        names = {None: "base", "a": "a1-", "b": "a2-", "c": "base"}[adapter_id]
        assert got[0][0].label.startswith(names)


def test_adapters_change_the_answer_and_top_k_is_respected(adapters: dict) -> None:
    image = random_image(7)

    async def main() -> tuple[list, list]:
        engine = VisionEngine(make_loaded(), InMemorySource(adapters), max_slots=2)
        await _start(engine)
        base = await engine.submit(None, [image, image], 2)
        conv_only = await engine.submit("c", [image], 7)
        await engine.shutdown(1.0)
        return base, conv_only

    base, conv_only = asyncio.run(main())
    assert [len(r) for r in base] == [2, 2] and base[0] == base[1]
    ref_base = torch.softmax(reference_logits(None, image, ImageTransform(size=16)), -1)
    assert abs(base[0][0].score - ref_base.max().item()) < TOL
    # The conv adapter changes the scores of the same (base) head.
    assert (
        max(
            abs(a - b)
            for a, b in zip(
                [p.score for p in sorted(conv_only[0], key=lambda p: p.index)],
                ref_base.tolist(),
                strict=True,
            )
        )
        > 1e-3
    )


def test_unknown_adapter_fails_only_its_request(adapters: dict) -> None:
    image = random_image(1)

    async def main() -> list:
        engine = VisionEngine(make_loaded(), InMemorySource(adapters), max_slots=2, max_wait=0.05)
        await _start(engine)
        out = await asyncio.gather(
            engine.submit("nope", [image], 3),
            engine.submit("a", [image], 3),
            return_exceptions=True,
        )
        await engine.shutdown(1.0)
        return out

    missing, ok = asyncio.run(main())
    assert isinstance(missing, AdapterNotFoundError)
    assert ok[0][0].label.startswith("a1-")


def test_adapter_transform_uses_saved_metadata() -> None:
    base = ImageTransform(size=224)
    assert adapter_transform(base, {}) is base
    assert adapter_transform(base, {"image_size": 64}) == ImageTransform(size=64)
    saved = ImageTransform(size=32, interpolation="bilinear").to_dict()
    assert adapter_transform(base, {"image_transform": saved, "image_size": 64}).to_dict() == saved


def test_an_adapter_asking_for_huge_images_is_refused_at_upload_and_at_use(adapters) -> None:
    """An adapter's metadata sets the crop every image of its requests is resized to (a
    [3, S, S] tensor each): above `MAX_ADAPTER_IMAGE_SIZE` it is a 422, at upload
    (`check_adapter`) and for one stored before the rule, never an allocation of
    120 GB."""
    from flora_server.engine.protocol import InvalidRequestError
    from flora_server.engine.vision import MAX_ADAPTER_IMAGE_SIZE

    base = ImageTransform(size=224)
    assert adapter_transform(base, {"image_size": MAX_ADAPTER_IMAGE_SIZE}).size == 1024
    huge = ImageTransform(size=100_000).to_dict()
    for metadata in ({"image_size": MAX_ADAPTER_IMAGE_SIZE + 1}, {"image_transform": huge}):
        with pytest.raises(ValueError, match="at most 1024"):
            adapter_transform(base, metadata)
    bad = make_conv_adapter(4, 3, image_size=100_000)
    stored = {**adapters, "huge": bad}

    async def main() -> tuple[object, list]:
        engine = VisionEngine(make_loaded(), InMemorySource(stored), max_slots=4, max_wait=0.05)
        await _start(engine)
        with pytest.raises(ValueError, match="100000-pixel images"):
            engine.check_adapter(bad)
        engine.check_adapter(adapters["b"])  # trained at 24 pixels: served
        try:
            refused: object = await engine.submit("huge", [random_image(0)], 3)
        except InvalidRequestError as exc:
            refused = exc
        fine = await engine.submit("b", [random_image(0)], 3)
        await engine.shutdown(1.0)
        return refused, fine

    refused, fine = asyncio.run(main())
    assert isinstance(refused, InvalidRequestError) and refused.param == "adapter_id"
    assert "at most 1024" in str(refused)
    assert len(fine[0]) == 3


# --- preprocessing off the worker thread ----------------------------------------------
# A request of large images used to be transformed on the worker, after admission: every
# request behind it waited for its preprocessing too, and --request-timeout could not end it.


def test_serve_transforms_off_the_worker_when_the_transform_is_known(
    adapters: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, str]] = []  # (crop size, thread)
    real = ImageTransform.__call__

    def spy(self: ImageTransform, image):  # type: ignore[no-untyped-def]
        calls.append((self.size, threading.current_thread().name))
        return real(self, image)

    monkeypatch.setattr(ImageTransform, "__call__", spy)
    images = [random_image(i) for i in range(3)]

    async def main() -> list:
        engine = VisionEngine(make_loaded(), InMemorySource(adapters), max_slots=2)
        await _start(engine)
        out = [
            await engine.submit(None, images, 100),  # the base's transform: known
            await engine.submit("b", images[:1], 100),  # b's 24 px: learnt from this batch
            await engine.submit("b", images[1:], 100),  # ... and used from here on
        ]
        await engine.shutdown(1.0)
        return out

    base, b_first, b_then = asyncio.run(main())
    worker = "flora-image-classifier"
    on_worker = [size for size, thread in calls if thread == worker]
    assert on_worker == [24]  # only b's first image, before its transform was known
    assert len(calls) == 6
    for i, got in enumerate(base):
        ref = torch.softmax(reference_logits(None, images[i], ImageTransform(size=16)), -1)
        assert max(abs(p.score - ref[p.index].item()) for p in got) < TOL
    for i, got in enumerate(b_first + b_then):
        ref = torch.softmax(reference_logits(adapters["b"], images[i], ImageTransform(size=24)), -1)
        assert max(abs(p.score - ref[p.index].item()) for p in got) < TOL


def test_prepared_pixels_are_used_only_for_the_transform_that_made_them(adapters: dict) -> None:
    image = random_image(4)
    t16, t24 = ImageTransform(size=16), ImageTransform(size=24)
    stale = PreparedImage(image, t16, torch.zeros(3, 16, 16))
    assert image_pixels(stale, t16) is stale.pixels
    assert torch.equal(image_pixels(stale, t24), t24(image))
    assert torch.equal(image_pixels(image, t24), t24(image))

    async def main() -> list:
        engine = VisionEngine(make_loaded(), InMemorySource(adapters), max_slots=2)
        await _start(engine)
        engine._last_transform["b"] = t16  # a wrong guess (b was replaced, say)
        out = await engine.submit("b", [image], 100)
        await engine.shutdown(1.0)
        return out

    got = asyncio.run(main())[0]
    ref = torch.softmax(reference_logits(adapters["b"], image, t24), -1)
    assert max(abs(p.score - ref[p.index].item()) for p in got) < TOL
