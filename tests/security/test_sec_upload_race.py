"""Property 4: two concurrent uploads of one id with different bytes -> exactly one 201 and
one 409, and the store holds the winner's bytes.

Both uploads are held at a barrier inside validation (which runs before the registry's
existence check), so both have passed every check before either commits: the race is real,
not two requests that happen to run one after the other."""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import threading
import time

from api_fakes import FakeEngine, fake_validator, make_archive
from fastapi.testclient import TestClient

from flora_server.main import create_app
from flora_server.settings import Settings


def test_concurrent_uploads_of_one_id_one_201_one_409(tmp_path):
    barrier = threading.Barrier(2, timeout=20)
    arrived: list[str] = []

    def validator(path):
        result = fake_validator(path)
        arrived.append(path.name)
        barrier.wait()  # both uploads validated; now both race for the id
        return result

    def factory(settings, registry, metrics):
        return FakeEngine(registry), validator

    app = create_app(Settings(home=tmp_path / "home"), engine_factory=factory)
    blobs = [make_archive(b"\x01" * 16), make_archive(b"\x02" * 16)]
    assert blobs[0] != blobs[1]
    with TestClient(app) as client:
        deadline = time.monotonic() + 10
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)

        def upload(data: bytes):
            return client.post(
                "/v1/adapters",
                data={"adapter_id": "race"},
                files={"archive": ("a.flora", io.BytesIO(data))},
            )

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            responses = list(pool.map(upload, blobs))
        assert len(arrived) == 2  # both really were in flight together
        codes = sorted(r.status_code for r in responses)
        assert codes == [201, 409], [r.text for r in responses]
        winner = next(i for i, r in enumerate(responses) if r.status_code == 201)
        loser = responses[1 - winner]
        assert loser.json()["error"]["type"] == "conflict_error"
        assert responses[winner].json()["sha256"] == hashlib.sha256(blobs[winner]).hexdigest()
        stored = tmp_path / "home" / "adapters" / "race.flora"
        assert stored.read_bytes() == blobs[winner]
        listed = client.get("/v1/adapters").json()
        assert [a["id"] for a in listed["data"]] == ["race"]
        assert listed["data"][0]["sha256"] == hashlib.sha256(blobs[winner]).hexdigest()
