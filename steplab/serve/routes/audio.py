"""``POST /v1/audio/transcriptions`` and ``POST /v1/audio/speech`` for speech runs (Step-Audio in miniature).

A served run is a speech model when its tokenizer carries a speech tokenizer (``tokenizer/speech/``); the routes
share the engine's weights and decode with ``eval/speech.py``'s SpeechModel, one request at a time per model in a
worker thread (the event loop stays free). Transcription is greedy; speech is sampled with a fixed seed (0 unless
the body has ``seed``), so the same input gives the same audio; ``candidates`` (1-8, an extension) returns the
best of that many samples as the model's own ASR hears them.

Errors are OpenAI's JSON: 400 for a missing/empty/undecodable file, audio longer than the model can read, an
unknown ``response_format`` (mp3 only when libsndfile can encode it), or fields we cannot honour; 404 for a
model that is not served or not a speech model; 413 (serve/gate.py) for a body over the server's byte limit.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from steplab.errors import DataError
from steplab.serve.common import guard, parse, state
from steplab.serve.errors import APIError
from steplab.serve.schema import SpeechRequest, openapi_body

router = APIRouter()
TRANSCRIPT_FORMATS = ("json", "text", "verbose_json")
MEDIA = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg"}


def speech_models(models: dict[str, Any], engines: dict) -> dict:
    """name -> SpeechModel for every served run directory whose tokenizer has a speech tokenizer."""
    from steplab.data.speech_lm import SPEECH_DIR, SpeechVocab
    from steplab.eval.speech import SpeechModel

    out = {}
    for name, spec in models.items():
        if isinstance(spec, (str, Path)) and (Path(spec) / "tokenizer" / SPEECH_DIR).is_dir():
            out[name] = SpeechModel(engines[name].model, SpeechVocab.load(Path(spec) / "tokenizer"), name)
    return out


def _speech_model(request: HTTPRequest, name: str | None):
    if not name:
        raise APIError(400, "'model' is required", param="model", code="missing_field")
    speech = getattr(request.app.state, "speech", {})
    if name not in speech:
        hint = f"speech models: {', '.join(sorted(speech))}" if speech else "no served model is a speech model"
        code = "model_not_found" if name not in state(request).engines else "model_not_speech"
        raise APIError(404, f"the model '{name}' cannot {'do speech' if code == 'model_not_speech' else 'be found'}; {hint}",
                       param="model", code=code)
    return speech[name]


def _run(sm, fn, *args):
    with sm.lock:  # one decode per model at a time: bounded work, predictable latency
        return fn(*args)


UPLOAD = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "model"],
    "properties": {"file": {"type": "string", "format": "binary"}, "model": {"type": "string"},
                   "response_format": {"type": "string", "enum": list(TRANSCRIPT_FORMATS)},
                   "language": {"type": "string"}, "temperature": {"type": "number"}}}}}}}


@router.post("/v1/audio/transcriptions", summary="Transcribe audio (multipart upload, as OpenAI)", openapi_extra=UPLOAD)
async def transcriptions(request: HTTPRequest):
    guard(request)
    from steplab.data.speech import load_audio

    try:
        form = await request.form()
    except Exception as e:  # malformed multipart or a non-form body
        raise APIError(400, f"the body is not a valid multipart/form-data upload ({str(e)[:120]})", code="invalid_body") from None
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    sm = _speech_model(request, fields.get("model"))
    fmt = fields.get("response_format", "json")
    if fmt not in TRANSCRIPT_FORMATS:
        raise APIError(400, f"response_format '{fmt}' is not supported; use one of {', '.join(TRANSCRIPT_FORMATS)}",
                       param="response_format", code="invalid_value")
    for name in ("prompt", "timestamp_granularities[]", "chunking_strategy"):
        if fields.get(name):
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    try:
        temperature = float(fields.get("temperature") or 0)
    except ValueError:
        raise APIError(400, "'temperature' must be a number", param="temperature", code="invalid_value") from None
    if temperature != 0:
        raise APIError(400, "only greedy transcription (temperature 0) is supported", param="temperature", code="unsupported_parameter")
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise APIError(400, "'file' is required: upload the audio as a multipart file field", param="file", code="missing_field")
    raw = await upload.read()
    limit = sm.max_audio_seconds()
    try:
        wav = load_audio(raw, what=f"the uploaded file '{upload.filename}'", max_seconds=limit)
    except DataError as e:
        raise APIError(400, str(e) + (f" (this model reads at most {limit:.1f} s)" if "long" in str(e) else ""),
                       param="file", code="invalid_audio") from None
    text = (await run_in_threadpool(_run, sm, sm.transcribe, [wav]))[0]
    if fmt == "text":
        return PlainTextResponse(text + "\n")
    if fmt == "json":
        return JSONResponse({"text": text})
    duration = round(len(wav) / 8000, 3)
    return JSONResponse({"task": "transcribe", "language": "english", "duration": duration, "text": text,
                         "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": duration, "text": text,
                                       "temperature": 0.0}]})


@router.post("/v1/audio/speech", summary="Generate speech from text", openapi_extra=openapi_body(SpeechRequest))
async def speech(request: HTTPRequest):
    guard(request)
    import soundfile as sf

    from steplab.data.speech import wav_bytes

    body = await parse(request, SpeechRequest)
    sm = _speech_model(request, body.model)
    fmt = body.response_format
    if fmt not in MEDIA or fmt.upper() not in sf.available_formats():
        ok = [f for f in MEDIA if f.upper() in sf.available_formats()]
        raise APIError(400, f"response_format '{fmt}' is not available on this server; use one of {', '.join(ok)}",
                       param="response_format", code="unsupported_format")
    room = sm.context - len(sm.vocab.tts_prompt(body.input))
    if room < 2 + 3 * sm.vocab.speech.n_q:
        raise APIError(400, f"the input is too long for this model's context of {sm.context} tokens; shorten it",
                       param="input", code="context_length_exceeded")
    k = body.candidates or 1
    wav = (await run_in_threadpool(_run, sm, lambda: sm.speak([body.input], seed=body.seed or 0, candidates=k)))[0]
    data = wav_bytes(wav, fmt) if fmt != "mp3" else _mp3(wav)
    return Response(data, media_type=MEDIA[fmt])


def _mp3(wav) -> bytes:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wav, 8000, format="MP3", subtype="MPEG_LAYER_III")
    return buf.getvalue()
