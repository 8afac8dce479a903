"""Fault drills for image requests: the vision application (as `make run PROFILE=tiny` deploys it, with two
edge replicas here) on the faults cluster, one edge replica killed while captions are being verified.

What the drill claims, and asserts: the replica killed held captions in flight (it is chosen by asking each
replica for its live sessions), every request gets a complete answer equal to the fault-free run's, the
image crossed the link again for the sessions the dead replica held (the new replica lacked it), and the
application is whole again afterwards.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from aiflow_ray.serve.configs import VISION_APP, VISION_PREFIX, vision_args
from tests.faults.conftest import Drill

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def _image(seed: int) -> str:
    small = (np.random.default_rng(seed).random((6, 8, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((320, 240), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGES = [_image(seed) for seed in range(3)]


def _body(index: int) -> dict[str, object]:
    return {"prompt": "Describe the image.", "images": [IMAGES[index]], "image_upload": "resized",
            "max_tokens": 48, "ignore_eos": True, "path": "device-edge", "draft_len": 3, "link_id": "drill-vision"}


@pytest.fixture(scope="module")
def vision(drill: Drill, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drill]:
    from ray import serve

    from aiflow_ray.serve import build_app

    args = vision_args("tiny")
    assert args is not None
    args["edge"] = {**args["edge"], "autoscaling": {"min_replicas": 2, "max_replicas": 2}}
    args["kb"] = {"path": str(tmp_path_factory.mktemp("vision-kb") / "kb.sqlite")}
    args["deadlines"] = {"request_s": 45, "edge_call_s": 5, "cloud_call_s": 10, "router_call_s": 1,
                         "link_outage_s": 1}
    serve.run(build_app(args), name=VISION_APP, route_prefix=VISION_PREFIX, blocking=False)
    vision_drill = Drill(f"{drill.url}{VISION_PREFIX}", drill.state_dir, app=VISION_APP)
    vision_drill.records = drill.records  # one report for every drill
    try:
        vision_drill.wait_until("the vision application answering /readyz", vision_drill.ready, 300)
        # Rounds of ~60 ms: a caption takes about a second, so the kill lands mid-verify.
        vision_drill.set_link("drill-vision", 2e6, 60)
        yield vision_drill
    finally:
        serve.delete(VISION_APP)  # the CPUs go back to the other drills


def test_edge_replica_killed_mid_caption(vision: Drill) -> None:
    reference = {}
    for index in range(len(IMAGES)):
        outcome = vision.send(_body(index))
        assert outcome.ok, (outcome.status, outcome.json)
        reference[index] = (outcome.token_ids, outcome.json["trace"]["image_bytes_sent"])
    bodies = [_body(i) for i in range(len(IMAGES))] * 3
    outcomes, pid, fault_at = vision.load(bodies, concurrency=6, fault=vision.kill_replica_holding_sessions,
                                          fault_after_s=0.1)
    assert pid > 0, "no edge replica was seen holding a caption in flight"
    resent_images = 0
    for outcome in outcomes:
        # Every caption completes, and equals the fault-free one token for token.
        assert outcome.ok, f"status {outcome.status}: {outcome.json or outcome.error}"
        index = IMAGES.index(outcome.body["images"][0])  # type: ignore[index]
        tokens, image_bytes = reference[index]
        assert outcome.token_ids == tokens, "output differs from the fault-free run"
        trace = outcome.json["trace"]
        if trace["context_resends"] or trace["failovers"]:
            # The replica that took the session over lacked the image: it crossed the link again.
            assert trace["image_bytes_sent"] >= 2 * image_bytes, trace
            resent_images += 1
    # The killed replica held a caption in flight: that session went on elsewhere, with its image resent.
    assert resent_images > 0, "the kill landed on a live caption, yet no caption failed over"
    vision.wait_healthy({"EdgeVerifier": 2})
    recovery_s = time.monotonic() - fault_at
    vision.record("vision edge replica killed mid-caption (SIGKILL)", outcomes, recovery_s,
                  f"{resent_images} of {len(outcomes)} captions resent their image to the other replica; "
                  "outputs identical")
