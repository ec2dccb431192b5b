"""Schemathesis against the server's own OpenAPI schema (GET /openapi.json): every route, with a valid key and
with none, schema-valid and schema-violating bodies, a fixed seed. Never a 500; a 503 only as the documented
back-pressure (``server_overloaded``); every 4xx in OpenAI's error JSON shape. The default run tries a short
fixed sample; ``-m slow`` tries many more. The counts go to docs/benchmarks.md."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
schemathesis = pytest.importorskip("schemathesis")
httpx = pytest.importorskip("httpx")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from serve_fixtures import Server, tiny_run  # noqa: E402

KEY = "sk-fuzz-0123456789"


@pytest.fixture(scope="module")
def server():
    import torch

    from steplab.serve.app import create_app
    from steplab.train.checkpoint import load_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _, model, tok, _ = load_run(tiny_run())
    # no failed-auth block here: the no-key half would trip it (test_serve_hardening covers the block)
    app = create_app({"step-1-nano": (model, tok)}, api_keys={KEY}, auth_failure_limit=None, max_request_bytes=200_000,
                     max_len=64)  # a short context keeps every generated request cheap
    with Server(app) as srv:
        raw = httpx.get(srv.url + "/openapi.json").json()
        # aim the generator at the served model most of the time (free strings would almost always be 404s)
        for name in ("ChatCompletionRequest", "CompletionRequest"):
            raw["components"]["schemas"][name]["properties"]["model"] = {"type": "string", "enum": ["step-1-nano"]}
        srv.schema = schemathesis.openapi.from_dict(raw)
        yield srv
    torch.set_num_threads(threads)


def _check(resp, case) -> None:
    where = f"{case.method} {case.formatted_path} body={str(case.body)[:300]!r}"
    assert resp.status_code != 500, f"500 for {where}: {resp.text[:300]}"
    if resp.status_code == 503:
        assert resp.json()["error"]["code"] == "server_overloaded", where
    if 400 <= resp.status_code < 500:
        err = resp.json().get("error")
        assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"} and err["message"], \
            f"{resp.status_code} not in OpenAI's error shape for {where}: {resp.text[:300]}"
    assert resp.status_code < 500 or resp.status_code == 503, where


def fuzz(srv, examples: int, seed: int) -> dict[str, int]:
    """About ``examples`` cases, shared out over every operation in the schema (at least 3 each), so a route
    added to the server is fuzzed without anyone having to list it here."""
    from schemathesis import GenerationMode

    counts: dict[str, int] = {}
    operations = [result.ok() for result in srv.schema.get_all_operations()]
    for op in operations:
        strategy = op.as_strategy(generation_mode=GenerationMode.POSITIVE) | \
            op.as_strategy(generation_mode=GenerationMode.NEGATIVE)
        _fuzz_operation(srv, strategy, max(3, examples // len(operations)), seed, counts)
    return counts


def _fuzz_operation(srv, strategy, examples: int, seed: int, counts: dict[str, int]) -> None:
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case):
        for with_key in (True, False):
            headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
            if with_key:
                headers["Authorization"] = f"Bearer {KEY}"
            case.headers = headers
            resp = case.call(base_url=srv.url, timeout=120)
            _check(resp, case)
            key = f"{case.method} {case.path} {'key' if with_key else 'no key'} {resp.status_code}"
            counts[key] = counts.get(key, 0) + 1

    run = pytest.importorskip("hypothesis").seed(seed)(run)
    run()


def _report(counts: dict[str, int]) -> None:
    print(f"\nfuzz: {sum(counts.values())} requests")
    for k, n in sorted(counts.items()):
        print(f"  {n:5d}  {k}")


def test_fuzz_api_short(server):
    counts = fuzz(server, examples=40, seed=10)
    _report(counts)
    assert sum(counts.values()) >= 40
    paths = {k.split()[1] for k in counts}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= paths


@pytest.mark.slow
def test_fuzz_api_long(server):
    counts = fuzz(server, examples=600, seed=11)
    _report(counts)
    assert sum(counts.values()) >= 1200
