"""``POST /v1/chat/completions``: messages under the tokenizer's chat template; message text is data, never markers."""
from __future__ import annotations

from fastapi import APIRouter, Request as HTTPRequest

from steplab.infer.prompts import chat_stop_ids, encode_chat
from steplab.serve.common import engine_for, guard, parse, state, submit
from steplab.serve.errors import APIError
from steplab.serve.media import chat_images, image_prompt
from steplab.serve.responses import respond
from steplab.serve.schema import ChatCompletionRequest, openapi_body

router = APIRouter()


@router.post("/v1/chat/completions", summary="Create a chat completion", openapi_extra=openapi_body(ChatCompletionRequest))
async def chat_completions(request: HTTPRequest):
    guard(request)
    body = await parse(request, ChatCompletionRequest)
    engine = engine_for(request, body.model)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    vision = getattr(engine.model.cfg, "vision", None)  # Step-1V: images at the model's place in their message
    size = vision.image_size if vision is not None and vision.image_size else None
    per_message = chat_images(body.messages, size, state(request).allow_remote_images)
    try:
        prompt = encode_chat(engine.tokenizer, messages)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    prompt, images = image_prompt(engine.tokenizer, prompt, per_message, vision.n_tokens if size else 0,
                                  vision.image_place if size else "start")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    handle = submit(engine, body, prompt, chat_stop_ids(engine.tokenizer), logprobs, "messages", images=images)
    return await respond(request, "chat", body, handle)
