"""Request bodies of the OpenAI API subset we serve (pydantic v2).

Unknown fields are accepted and ignored, as OpenAI clients send many optional ones (``user``, ``store``,
``metadata``...). Fields we cannot honour (tools, logit_bias, suffix, best_of > n; echo outside completions) are rejected with a
400 by ``unsupported()`` rather than silently ignored. Responses are built as plain dicts in responses.py: that is
cheaper on the streaming path than validating every chunk.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageURL(_Body):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Body):
    """An image for a Step-1V model; decoded and checked by serve/media.py."""

    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if part.type == "text")


class _Sampling(_Body):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)  # extension (vLLM has it too)
    n: int | None = Field(None, ge=1, le=16)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool | None = False  # extension (as vLLM): each choice also lists its token ids
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(s == "" for s in v):
            raise ValueError("stop sequences must not be empty")
        return v

    def unsupported(self) -> str | None:
        """The first field set that this server does not implement, else None."""
        extra = self.model_extra or {}
        for name in ("tools", "functions", "tool_choice", "function_call", "logit_bias", "response_format", "suffix"):
            if extra.get(name) not in (None, {}, []):
                return name
        if extra.get("echo"):
            return "echo"
        best_of = extra.get("best_of")
        if best_of not in (None, self.n or 1):
            return "best_of"
        return None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False  # the prompt comes back before the completion; with logprobs, scored (first: null)
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo: score the prompt, generate nothing

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and len(v) == 0:
            raise ValueError("prompt must not be empty")
        return v


MAX_SPEECH_CANDIDATES = 8  # the most candidates one /v1/audio/speech request may ask for


class SpeechRequest(_Body):
    """``POST /v1/audio/speech``: text in, audio out (one voice; ``voice`` is accepted and names it only)."""
    model: str
    input: str = Field(min_length=1, max_length=4096)
    voice: Union[str, dict, None] = None
    response_format: str = "mp3"  # OpenAI's default; wav and flac always, mp3 when libsndfile encodes it
    speed: float | None = Field(None, ge=0.25, le=4.0)
    seed: int | None = None  # extension: the sampling seed (default 0: the same input gives the same audio)
    # extension: best-of-k, each candidate checked by the model's own ASR; bounded, since k multiplies the work
    candidates: int | None = Field(None, ge=1, le=MAX_SPEECH_CANDIDATES)

    def unsupported(self) -> str | None:
        extra = self.model_extra or {}
        if self.speed not in (None, 1.0):
            return "speed"
        for name in ("instructions", "stream_format"):
            if extra.get(name) not in (None, "", "audio"):
                return name
        return None


# ---- OpenAPI: the bodies are parsed by hand (key first, 400 not 422), so the schema is declared here ----------

def openapi_body(model: type[BaseModel]) -> dict:
    """``openapi_extra`` for a route whose JSON body is ``model``."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def openapi_components() -> dict:
    """components.schemas for every request body (and the models they use)."""
    out: dict = {}
    for model in (ChatCompletionRequest, CompletionRequest, SpeechRequest):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out
