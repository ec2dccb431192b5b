"""/v1/videos (issue 21): jobs per key, the same auth and error JSON as the other routes, disk cap and expiry."""
import io

import pytest
import torch
from fastapi.testclient import TestClient

from steplab.config import RunConfig
from steplab.models.dit import VideoDiT
from steplab.serve.app import create_app
from steplab.serve.video_jobs import VideoService

A, B = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}


def tiny_dit() -> VideoDiT:
    cfg = RunConfig.from_dict(dict(model=dict(video=dict(frames=9, size=16, digit_size=6, channels=8, z_channels=4,
                                                         dit_dim=24, dit_heads=2, dit_layers=1, text_layers=1))))
    torch.manual_seed(0)
    return VideoDiT(cfg.model).eval()


@pytest.fixture
def setup(tmp_path):
    now = [1000.0]
    videos = VideoService({"step-video-nano": tiny_dit()}, tmp_path / "videos", ttl_s=60, max_pending=2,
                          clock=lambda: now[0])
    app = create_app({}, api_keys={"key-a", "key-b"}, videos=videos)
    return TestClient(app), videos, now  # no `with`: the worker thread stays off, tests drain the queue themselves


def create(client, headers=A, **body):
    return client.post("/v1/videos", headers=headers, json={"model": "step-video-nano", "prompt": "a 7 moving up", "steps": 2, **body})


def test_job_lifecycle_and_gif_content(setup):
    client, videos, _ = setup
    r = create(client)
    assert r.status_code == 200 and r.json()["status"] == "queued" and r.json()["object"] == "video"
    job = r.json()["id"]
    r = client.get(f"/v1/videos/{job}/content", headers=A)
    assert r.status_code == 409 and r.json()["error"]["code"] == "video_not_ready"
    assert videos.run_pending() == 1
    card = client.get(f"/v1/videos/{job}", headers=A).json()
    assert card["status"] == "completed" and card["size"] == "16x16" and card["expires_at"] == 1060
    r = client.get(f"/v1/videos/{job}/content", headers=A)
    assert r.status_code == 200 and r.headers["content-type"] == "image/gif" and r.content[:6] == b"GIF89a"
    import imageio.v3 as iio

    frames = iio.imread(io.BytesIO(r.content), extension=".gif", index=None)
    assert frames.shape[0] == 9 and frames.shape[1:3] == (64, 64)  # 9 frames, each pixel drawn 4x4
    assert [j["id"] for j in client.get("/v1/videos", headers=A).json()["data"]] == [job]
    assert client.delete(f"/v1/videos/{job}", headers=A).json()["deleted"] is True
    assert client.get(f"/v1/videos/{job}", headers=A).status_code == 404
    assert not list(videos.directory.iterdir())


def test_jobs_are_private_to_their_key(setup):
    client, videos, _ = setup
    job = create(client).json()["id"]
    videos.run_pending()
    for path in (f"/v1/videos/{job}", f"/v1/videos/{job}/content"):
        r = client.get(path, headers=B)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"  # same as an unknown id
    assert client.delete(f"/v1/videos/{job}", headers=B).status_code == 404
    assert client.get("/v1/videos", headers=B).json()["data"] == []
    assert client.get(f"/v1/videos/{job}", headers=A).status_code == 200


def test_auth_and_bad_requests_use_the_error_json(setup):
    client, _, _ = setup
    r = client.post("/v1/videos", json={"model": "step-video-nano", "prompt": "a 1"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    cases = [({"seconds": "8"}, 400, "unsupported_parameter"), ({"steps": 0}, 400, "invalid_value"),
             ({"prompt": ""}, 400, "invalid_value"), ({"prompt": "x" * 1001}, 400, "invalid_value"),
             ({"model": "nope"}, 404, "model_not_found"), ({"guidance_scale": 1e9}, 400, "invalid_value")]
    for extra, status, code in cases:
        r = create(client, **extra)
        assert r.status_code == status and r.json()["error"]["code"] == code, (extra, r.json())
    r = client.get("/v1/videos/../../etc/passwd", headers=A)
    assert r.status_code == 404 and "error" in r.json()
    assert client.get("/v1/videos/video_" + "0" * 32, headers=A).status_code == 404


def test_queue_cap_expiry_and_disk_cap(setup):
    client, videos, now = setup
    first = create(client).json()["id"]
    create(client, seed=1)
    r = create(client, seed=2)  # max_pending=2
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    videos.run_pending()
    now[0] += 61  # past the ttl: the first two expire, files deleted
    card = client.get(f"/v1/videos/{first}", headers=A).json()
    assert card["status"] == "expired" and not list(videos.directory.iterdir())
    r = client.get(f"/v1/videos/{first}/content", headers=A)
    assert r.status_code == 404 and r.json()["error"]["code"] == "video_expired"
    videos.max_bytes = 1  # nothing fits: the job fails with its reason, the worker goes on
    job = create(client).json()["id"]
    videos.run_pending()
    assert client.get(f"/v1/videos/{job}", headers=A).json()["status"] == "failed"
    videos.max_bytes = 10**9
    a = create(client, seed=3).json()["id"]
    videos.run_pending()
    videos.max_bytes = int(videos.jobs[a].bytes * 1.5)  # room for one clip: the next one evicts the oldest
    b = create(client, seed=4).json()["id"]
    videos.run_pending()
    assert videos.jobs[a].status == "expired" and not videos.path(videos.jobs[a]).exists()
    assert videos.jobs[b].status == "completed" and videos.path(videos.jobs[b]).exists()


def test_serve_verb_takes_video_runs_out_of_the_text_engines(tmp_path):
    import argparse
    import json

    from safetensors.torch import save_file

    from steplab.cli.serve import _video_service

    model = tiny_dit()
    cfg = RunConfig.from_dict(dict(model=dict(family="video-dit", video=dict(
        frames=9, size=16, digit_size=6, channels=8, z_channels=4, dit_dim=24, dit_heads=2, dit_layers=1, text_layers=1))))
    run = tmp_path / "dit"
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "checkpoints" / "step_00000001" / "model.safetensors"))
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    models = {"step-video-nano": str(run), "step-1-8k": str(tmp_path / "text-run")}
    args = argparse.Namespace(video_dir=str(tmp_path / "videos"), video_max_bytes=1000, video_ttl=5)
    videos = _video_service(models, args)
    assert models == {"step-1-8k": str(tmp_path / "text-run")} and list(videos.models) == ["step-video-nano"]
    assert videos.max_bytes == 1000 and videos.ttl_s == 5
    assert torch.equal(videos.models["step-video-nano"].patch_in.weight, model.patch_in.weight)
