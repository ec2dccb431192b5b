"""Prompt scoring on /v1/completions (echo, prompt logprobs, max_tokens 0, batches, token-id prompts) with the
official openai client, and lm-evaluation-harness over HTTP (local-completions) and in process (the steplab
model): the same accuracy on the same local task (tests/lm_eval_tasks, no download), dense and MoE, fp32."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
lm_eval = pytest.importorskip("lm_eval")

from serve_fixtures import Server, tiny_run  # noqa: E402

from steplab.infer.engine import Engine, Request  # noqa: E402

TASKS = Path(__file__).parent / "lm_eval_tasks"
MODEL = "step-1-nano"


@pytest.fixture(scope="module")
def loaded():
    import torch

    from steplab.train.checkpoint import load_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tiny_run()
    _, model, tokenizer, _ = load_run(run)
    yield run, model, tokenizer
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def moe(loaded):
    """A small Step-2 MoE model (seeded random weights) with the dense run's tokenizer."""
    import torch

    from steplab.config import ModelConfig, MoEConfig
    from steplab.models import build_model

    _, _, tok = loaded
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layer=2, n_head=4, max_seq_len=256,
                      moe=MoEConfig(n_experts=4, top_k=2, n_shared=1))
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def server(loaded, moe):
    from steplab.serve.app import create_app

    _, model, tok = loaded
    engines = {MODEL: Engine(model, tok, name=MODEL, max_batch=8, max_queue=64), "moe": Engine(moe, tok, name="moe", max_batch=8)}
    app = create_app(engines, api_keys=None)
    with Server(app) as srv:
        srv.engines = engines
        yield srv
    for e in engines.values():
        e.stop()


def _reference_logprobs(model, ids):
    """log p(ids[t] | ids[:t]) for t >= 1 from one full forward pass (no cache, no engine)."""
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).float()[0], dim=-1)
    return [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]


def test_engine_prompt_logprobs_match_full_forward_across_chunks(loaded):
    _, model, tok = loaded
    ids = [tok.bos_id] + tok.encode("def main(argv):\n    return parse(argv)\n")
    ref = _reference_logprobs(model, ids)
    with Engine(model, tok, max_batch=2, prefill_chunk=5) as engine:  # the prompt spans several chunks
        out = engine.generate(Request(ids, max_tokens=0, prompt_logprobs=2))[0]
        assert out.tokens == [] and out.finish_reason == "length"
        lps = out.prompt_logprobs
        assert lps[0] is None and [e.token for e in lps[1:]] == ids[1:]
        assert [e.logprob for e in lps[1:]] == pytest.approx(ref, abs=1e-4)
        assert all(len(e.top) == 2 and e.top[0][1] >= e.top[1][1] for e in lps[1:])
        with pytest.raises(ValueError, match="max_tokens"):
            engine.submit(Request(ids, max_tokens=0))  # generating nothing is only allowed when scoring


def test_echo_logprobs_batch_and_token_prompts_with_openai_client(server, loaded):
    _, model, tok = loaded
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    text = "import os\nimport sys\n"
    ids = [tok.bos_id] + tok.encode(text)
    ref = _reference_logprobs(model, ids)

    r = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0)
    c = r.choices[0]
    assert c.text == text and c.finish_reason == "length" and r.usage.completion_tokens == 0
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    assert c.logprobs.token_logprobs[1:] == pytest.approx(ref, abs=1e-4)
    assert len(c.logprobs.tokens) == len(ids) and c.logprobs.text_offset[1] == 0  # <|bos|> takes no characters

    # echo + generation: the prompt, then the greedy completion; logprobs cover both
    plain = client.completions.create(model=MODEL, prompt=text, max_tokens=5, temperature=0)
    both = client.completions.create(model=MODEL, prompt=text, max_tokens=5, temperature=0, echo=True, logprobs=0)
    assert both.choices[0].text == text + plain.choices[0].text
    assert len(both.choices[0].logprobs.token_logprobs) == len(ids) + 5

    # a batch of token-id prompts (used as given: no <|bos|> added), n=2: choice i*n+j
    p1, p2 = tok.encode("def f(x):"), tok.encode("class A:")
    r = client.completions.create(model=MODEL, prompt=[p1, p2], max_tokens=1, echo=True, logprobs=1, temperature=0, n=2,
                                  extra_body={"return_token_ids": True})
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].model_extra["prompt_token_ids"] == p1 and r.choices[2].model_extra["prompt_token_ids"] == p2
    assert r.choices[0].text.startswith("def f(x):") and r.choices[2].text.startswith("class A:")
    assert r.choices[2].logprobs.token_logprobs[1:len(p2)] == pytest.approx(_reference_logprobs(model, p2), abs=1e-4)
    assert r.usage.prompt_tokens == len(p1) + len(p2) and r.usage.completion_tokens == 4
    strings = client.completions.create(model=MODEL, prompt=["a = 1", "b = 2"], max_tokens=3, temperature=0)
    assert len(strings.choices) == 2


def test_prompt_scoring_errors(server, loaded):
    _, _, tok = loaded
    url = server.url + "/v1/completions"

    def err(body, status):
        r = httpx.post(url, json={"model": MODEL, **body}, timeout=30)
        assert r.status_code == status, r.text
        assert r.json()["error"]["message"]
        return r.json()["error"]["message"]

    assert "echo" in err({"prompt": "x", "max_tokens": 0}, 400)
    assert str(tok.vocab_size) in err({"prompt": [5, tok.vocab_size], "echo": True, "max_tokens": 0}, 400)
    assert "empty" in err({"prompt": [[5], []], "max_tokens": 1}, 400)
    assert "split the batch" in err({"prompt": ["x"] * 65, "max_tokens": 1}, 413)  # more prompts than the queue
    assert "65536" in err({"prompt": ["x"] * 20, "n": 16, "max_tokens": 256}, 413)  # prompts x n x max_tokens
    assert "stream" in err({"prompt": "x", "echo": True, "stream": True}, 400)
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "echo": True,
                                                               "messages": [{"role": "user", "content": "x"}]}, timeout=30)
    assert r.status_code == 400 and "echo" in r.json()["error"]["message"]  # echo is a completions feature


@pytest.mark.parametrize("name", [MODEL, "moe"])
def test_lm_eval_http_equals_in_process(server, loaded, moe, name, monkeypatch):
    """The harness's local-completions model against our server and the in-process steplab model score the
    local multiple-choice task identically (fp32), for the dense run and the MoE model."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from steplab.eval.harness import SteplabLM
    from steplab.eval.runner import EngineLM

    run, model, tok = loaded
    monkeypatch.chdir(TASKS)  # the task YAMLs name their data files relative to this folder
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    tasks = ["steplab_next_line"]
    http = simple_evaluate(model="local-completions", tasks=tasks, task_manager=manager, model_args={
        "model": name, "base_url": server.url + "/v1/completions", "tokenizer": str(Path(run) / "tokenizer"),
        "tokenizer_backend": "huggingface", "batch_size": 8, "max_length": 255, "num_concurrent": 1})
    with EngineLM(moe if name == "moe" else model, tok, max_batch=8) as lm:
        local = simple_evaluate(model=SteplabLM(lm=lm, max_length=255), tasks=tasks, task_manager=manager)
    a, b = http["results"]["steplab_next_line"], local["results"]["steplab_next_line"]
    assert a["acc,none"] == b["acc,none"] and a["acc_norm,none"] == b["acc_norm,none"]
    assert 0 <= a["acc,none"] <= 1 and http["n-samples"]["steplab_next_line"]["effective"] == 40


@pytest.mark.slow  # ~25 s quiet (the harness's imports and three tasks); the parity test above covers the adapter
def test_steplab_eval_lm_eval_verb_all_request_types(loaded, monkeypatch, capsys):
    """`steplab eval RUN --lm-eval ... --include-path DIR`: multiple choice, generate_until, rolling loglikelihood."""
    from steplab.cli import main

    run, _, _ = loaded
    monkeypatch.chdir(TASKS)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert main(["eval", str(run), "--lm-eval", "steplab_next_line,steplab_complete_line,steplab_code_ppl",
                 "--include-path", str(TASKS), "--device", "cpu", "--limit", "10"]) == 0
    out = capsys.readouterr().out
    assert "steplab_next_line: " in out and "steplab_complete_line: " in out and "bits_per_byte" in out

    assert main(["eval", str(run), "--lm-eval", "no_such_task_xyz", "--include-path", str(TASKS)]) == 2
    assert "unknown lm-eval task(s) no_such_task_xyz" in capsys.readouterr().err


def test_lm_eval_registry_knows_steplab():
    import steplab.eval.harness  # noqa: F401  (registers the model)
    from lm_eval.api.registry import get_model

    assert get_model("steplab").__name__ == "SteplabLM"


def test_plain_lm_eval_command_finds_steplab_through_the_pth_hook(loaded, tmp_path, monkeypatch):
    """`python -m steplab.eval.lm_eval_plugin install` writes a .pth line; a fresh interpreter that processes it
    (as site.py does for site-packages) runs the harness's own CLI with `--model steplab --model_args run=DIR`
    and scores the local task exactly as the in-process model does."""
    import json
    import os
    import subprocess
    import sys

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from steplab.eval.harness import SteplabLM
    from steplab.eval.lm_eval_plugin import PTH_NAME, install, remove

    run, _, _ = loaded
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    assert install(site_dir) == site_dir / PTH_NAME
    cli = ["lm_eval", "--model", "steplab", "--model_args", f"run={run},dtype=fp32", "--device", "cpu", "--batch_size", "8",
           "--tasks", "steplab_next_line", "--include_path", str(TASKS), "--limit", "12",
           "--output_path", str(tmp_path / "out")]
    code = (f"import site, sys; site.addsitedir({str(site_dir)!r}); sys.argv = {cli!r}; "
            "from lm_eval.__main__ import cli_evaluate; cli_evaluate()")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=TASKS, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["steplab_next_line"]

    monkeypatch.chdir(TASKS)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    local = simple_evaluate(model=SteplabLM(run=str(run), device="cpu", dtype="fp32", batch_size=8),
                            tasks=["steplab_next_line"], task_manager=manager, limit=12)["results"]["steplab_next_line"]
    assert got["acc,none"] == local["acc,none"] and got["acc_norm,none"] == local["acc_norm,none"]
    remove(site_dir)
    assert not (site_dir / PTH_NAME).exists()


def test_the_pth_line_is_silent_where_the_steplab_found_has_no_hook(tmp_path):
    """The .pth line runs in every Python process: with an older steplab first on the path (no hook module) it
    must do nothing and print nothing."""
    import os
    import subprocess
    import sys

    from steplab.eval.lm_eval_plugin import install

    site_dir, old = tmp_path / "site", tmp_path / "old"
    site_dir.mkdir()
    (old / "steplab").mkdir(parents=True)
    (old / "steplab" / "__init__.py").write_text("")
    install(site_dir)
    code = f"import site; site.addsitedir({str(site_dir)!r}); print('ok')"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(old)},
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", "")
