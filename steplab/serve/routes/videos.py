"""OpenAI-style video jobs: ``POST /v1/videos`` (create), ``GET /v1/videos`` (list yours), ``GET /v1/videos/{id}``
(status), ``GET /v1/videos/{id}/content`` (the GIF), ``DELETE /v1/videos/{id}``.

Same guard as every /v1 route (key, brute-force block, rate limit) and the same error JSON. A job is visible only
to the key that created it: another key's id answers 404 exactly as an unknown id does. The prompt is data: it
becomes word ids of the text encoder's vocabulary (unknown words are ``<unk>``, at most TEXT_LEN words).
"""
from __future__ import annotations

import queue

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from steplab.serve.auth import KeyChecker, bucket_name
from steplab.serve.common import parse, guard, state
from steplab.serve.errors import APIError
from steplab.serve.schema import openapi_body

router = APIRouter()


class VideoRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    prompt: str = Field(min_length=1, max_length=1000)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    steps: int = Field(30, ge=1, le=100)  # Euler steps of the flow sampler
    guidance_scale: float = Field(5.0, ge=0.0, le=20.0)  # classifier-free guidance

    def unsupported(self) -> str | None:
        """Fields OpenAI's API has that this server cannot honour (clip length and size are the model's)."""
        return next(iter(self.model_extra or {}), None)


def service(request: HTTPRequest):
    videos = getattr(state(request), "videos", None)
    if videos is None:
        raise APIError(404, "this server has no video models; start it with a video-dit run to use /v1/videos",
                       code="not_found")
    return videos


def owner(request: HTTPRequest) -> str:
    """Whose job this is: a hash of the presented key ("" when the server runs without keys)."""
    if state(request).checker is None:
        return ""
    return bucket_name(KeyChecker.token(request.headers.get("authorization"))[0] or "")


def job_for(request: HTTPRequest, job_id: str):
    job = service(request).get(owner(request), job_id)
    if job is None:
        raise APIError(404, f"no video job '{job_id[:64]}' for this API key", param="video_id", code="not_found")
    return job


@router.post("/v1/videos", summary="Create a text-to-video job", openapi_extra=openapi_body(VideoRequest))
async def create_video(request: HTTPRequest):
    guard(request)
    videos = service(request)
    body = await parse(request, VideoRequest)
    if body.model not in videos.models:
        raise APIError(404, f"the video model '{body.model[:64]}' does not exist; available: {', '.join(sorted(videos.models))}",
                       param="model", code="model_not_found")
    try:
        job = videos.submit(owner(request), body.model, body.prompt, body.seed, body.steps, body.guidance_scale)
    except queue.Full:
        raise APIError(503, f"{videos.max_pending} video jobs are waiting already; retry later", type="server_error",
                       code="server_overloaded", headers={"Retry-After": "5"}) from None
    return videos.card(job)


@router.get("/v1/videos", summary="List your video jobs")
async def list_videos(request: HTTPRequest):
    guard(request)
    videos = service(request)
    return {"object": "list", "data": [videos.card(j) for j in videos.list(owner(request))]}


@router.get("/v1/videos/{video_id}", summary="A video job's status")
async def get_video(video_id: str, request: HTTPRequest):
    guard(request)
    return service(request).card(job_for(request, video_id))


@router.get("/v1/videos/{video_id}/content", summary="The finished video (GIF)")
async def video_content(video_id: str, request: HTTPRequest):
    guard(request)
    job = job_for(request, video_id)
    if job.status == "expired":
        raise APIError(404, f"video '{video_id}' has expired or was removed to stay under the storage cap; create it again",
                       param="video_id", code="video_expired")
    if job.status != "completed":
        raise APIError(409, f"video '{video_id}' is {job.status}, not completed; poll GET /v1/videos/{video_id}",
                       param="video_id", code="video_not_ready")
    path = service(request).path(job)
    return FileResponse(path, media_type="image/gif", filename=f"{job.id}.gif")


@router.delete("/v1/videos/{video_id}", summary="Delete a video job and its file")
async def delete_video(video_id: str, request: HTTPRequest):
    guard(request)
    job = job_for(request, video_id)
    service(request).delete(owner(request), job.id)
    return {"id": job.id, "object": "video.deleted", "deleted": True}
