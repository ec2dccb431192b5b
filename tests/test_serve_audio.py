"""`/v1/audio/transcriptions` and `/v1/audio/speech` on a tiny speech run, driven by the official openai client;
error cases over raw HTTP. The uploaded WAV must get exactly the transcript the library (steplab eval) gives."""
from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_fixtures import Server, one_thread  # noqa: E402,F401,F811 (pytest fixture)
from speech_fixtures import tiny_speech_run  # noqa: E402
from steplab.data.speech import espeak_available, load_audio, wav_bytes  # noqa: E402

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed (run `make speech`)")
KEY = "sk-audio-test-0123456789"
MODEL = "step-audio-nano"


@pytest.fixture(scope="module")
def server():
    from steplab.serve.app import create_app

    run, clips = tiny_speech_run()
    app = create_app({MODEL: str(run)}, api_keys={KEY}, max_request_bytes=200_000)
    with Server(app) as srv:
        srv.run, srv.clips, srv.app = run, clips, app
        yield srv


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _error(resp, status, code=None):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"} and "Traceback" not in resp.text
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]


def test_transcription_matches_the_library_in_every_format(server, client, one_thread):
    from steplab.eval.speech import SpeechModel

    clip = server.clips[0]
    data = wav_bytes(clip.wav)
    expected = SpeechModel.from_run(server.run, device="cpu").transcribe([load_audio(data)])[0]
    got = client.audio.transcriptions.create(model=MODEL, file=("clip.wav", data, "audio/wav"))
    assert got.text == expected
    text = client.audio.transcriptions.create(model=MODEL, file=("clip.wav", data, "audio/wav"), response_format="text")
    assert text.strip() == expected
    verbose = client.audio.transcriptions.create(model=MODEL, file=("clip.wav", data, "audio/wav"),
                                                 response_format="verbose_json")
    assert verbose.text == expected and abs(verbose.duration - len(clip.wav) / 8000) < 0.01
    flac = client.audio.transcriptions.create(model=MODEL, file=("clip.flac", wav_bytes(clip.wav, "flac"), "audio/flac"))
    assert flac.text == expected  # FLAC is lossless: the same samples, the same tokens


def test_speech_returns_decodable_audio_deterministically(client):
    import soundfile as sf

    a = client.audio.speech.create(model=MODEL, voice="alloy", input="one", response_format="wav").content
    b = client.audio.speech.create(model=MODEL, voice="alloy", input="one", response_format="wav").content
    assert a == b  # seeded sampling: the same input gives the same audio
    wav, sr = sf.read(io.BytesIO(a))
    assert sr == 8000 and wav.ndim == 1 and len(wav) > 0 and np.isfinite(wav).all()
    flac = client.audio.speech.create(model=MODEL, voice="alloy", input="two", response_format="flac").content
    assert sf.read(io.BytesIO(flac))[1] == 8000
    if "MP3" in sf.available_formats():
        mp3 = client.audio.speech.create(model=MODEL, voice="alloy", input="two", response_format="mp3").content
        assert mp3[:3] == b"ID3" or mp3[0] == 0xFF


def test_speech_best_of_k_matches_the_library_and_is_bounded(server, client, one_thread):
    from steplab.eval.speech import SpeechModel
    from steplab.serve.schema import MAX_SPEECH_CANDIDATES

    got = client.audio.speech.create(model=MODEL, voice="alloy", input="one", response_format="wav",
                                     extra_body={"candidates": 2}).content
    sm = SpeechModel.from_run(server.run, device="cpu")
    assert got == wav_bytes(sm.speak(["one"], seed=0, candidates=2)[0])  # the same best-of-2 as the library
    h = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=60) as c:
        for bad in (0, MAX_SPEECH_CANDIDATES + 1, "many"):  # k multiplies the work: user input stays bounded
            body = {"model": MODEL, "input": "one", "response_format": "wav", "candidates": bad}
            assert _error(c.post(server.url + "/v1/audio/speech", headers=h, json=body), 400, "invalid_value")["param"] == "candidates"


def test_audio_errors_are_openai_errors(server, one_thread):
    h = {"Authorization": f"Bearer {KEY}"}
    url = server.url + "/v1/audio/transcriptions"
    wav = wav_bytes(server.clips[0].wav)
    with httpx.Client(timeout=60) as c:
        _error(c.post(url, headers=h, files={"file": ("x.wav", b"not audio at all" * 8)}, data={"model": MODEL}), 400, "invalid_audio")
        _error(c.post(url, headers=h, files={"file": ("x.wav", b"")}, data={"model": MODEL}), 400)
        _error(c.post(url, headers=h, data={"model": MODEL}), 400, "missing_field")
        _error(c.post(url, headers=h, files={"file": ("x.wav", wav)}, data={"model": "nope"}), 404, "model_not_found")
        _error(c.post(url, headers=h, files={"file": ("x.wav", wav)}, data={"model": MODEL, "response_format": "srt"}), 400, "invalid_value")
        _error(c.post(url, headers=h, files={"file": ("x.wav", wav)}, data={"model": MODEL, "temperature": "hot"}), 400, "invalid_value")
        _error(c.post(url, headers={**h, "Content-Type": "multipart/form-data; boundary=zz"}, content=b"--zz\r\ngarbage"), 400)
        long = wav_bytes(np.zeros(8000 * 10, dtype=np.float32))  # 10 s: more than the tiny model's context holds
        assert "at most" in _error(c.post(url, headers=h, files={"file": ("x.wav", long)}, data={"model": MODEL}), 400)["message"]
        _error(c.post(url, headers=h, files={"file": ("x.wav", b"\0" * 300_000)}, data={"model": MODEL}), 413, "request_too_large")
        _error(c.post(url, files={"file": ("x.wav", wav)}, data={"model": MODEL}), 401)
        speech = server.url + "/v1/audio/speech"
        _error(c.post(speech, headers=h, json={"model": MODEL, "input": "one", "response_format": "opus"}), 400, "unsupported_format")
        _error(c.post(speech, headers=h, json={"model": MODEL, "input": ""}), 400)
        _error(c.post(speech, headers=h, json={"model": MODEL, "input": "one", "speed": 2.0}), 400, "unsupported_parameter")
        _error(c.post(speech, headers=h, json={"model": MODEL, "input": "one " * 500, "response_format": "wav"}), 400,
               "context_length_exceeded")
