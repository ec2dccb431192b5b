"""lm-evaluation-harness in process: a steplab run as an ``lm_eval`` model, scored on the serving engine.

    steplab eval runs/NAME --lm-eval arc_easy,hellaswag [--include-path DIR]
    python -m steplab.eval.lm_eval_cli --model steplab --model_args run=runs/NAME --tasks ...   # lm_eval's own CLI
    lm_eval --model steplab --model_args run=runs/NAME --tasks ...      # harness versions with entry-point plugins

Importing this module registers the model under the name ``steplab`` (``lm_eval.api.registry``); the
package also declares it as the entry point ``steplab`` in the ``lm_eval.models`` group, for harness versions
that load model plugins from entry points. Tokenization matches the harness's HTTP models
(``local-completions`` with the exported HF tokenizer): no BOS unless ``add_bos_token=True``, the
tokenizer's BOS as the prefix of an empty context. So the same task gives the same accuracy in process and
over ``/v1/completions``.
"""
from __future__ import annotations

import lm_eval.models  # noqa: F401  (the built-in models first: the registry loads them only while it is empty)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from steplab.eval.runner import EngineLM


def _bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


@register_model("steplab")
class SteplabLM(TemplateLM):
    def __init__(self, run: str | None = None, device: str = "auto", dtype: str = "fp32", batch_size: int | str = 16,
                 max_gen_toks: int = 256, max_length: int | None = None, add_bos_token: bool = False, lm: EngineLM | None = None,
                 **kwargs):
        super().__init__()
        if lm is None:
            if not run:
                raise ValueError("the steplab model needs run=RUN_DIR (e.g. --model_args run=runs/NAME)")
            bs = 16 if batch_size is None or str(batch_size).startswith("auto") else int(batch_size)
            lm = EngineLM.from_run(run, device=device or "auto", dtype=dtype, max_batch=max(1, bs))
        self.lm = lm
        self.tok = lm.tokenizer
        self._max_gen_toks = int(max_gen_toks)
        self._max_length = int(max_length) if max_length else lm.context_len
        if self._max_length > lm.context_len:
            raise ValueError(f"max_length={self._max_length} exceeds the model's context {lm.context_len}")
        self.add_bos_token = _bool(add_bos_token)

    # -- what TemplateLM needs
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return "steplab"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tok.encode(string)
        return [self.tok.bos_id] + ids if (add_special_tokens or self.add_bos_token) else ids

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tok.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = []
        for _, ctx, cont in requests:
            whole = (ctx + cont)[-self.max_length:]  # cut the context from the left, as the harness does
            pairs.append((whole[:len(whole) - len(cont)], cont))
        results = self.lm.loglikelihood(pairs)
        for (key, _, _), res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in [r.args for r in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length - 1,
                context_len=1)]
            total = sum(lp for lp, _ in self.lm.loglikelihood(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        prompts = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs)
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(kw.pop("max_gen_toks", self._max_gen_toks))
            if kw.get("do_sample") or float(kw.get("temperature", 0) or 0) > 0:
                raise ValueError("the steplab model generates greedily only (do_sample/temperature > 0 given)")
            prompts.append(self.tok_encode(context))
            groups.setdefault((max_tokens, tuple(until)), []).append(i)
        for (max_tokens, until), idx in groups.items():
            texts = self.lm.generate([prompts[i] for i in idx], max_tokens, until)
            for i, text in zip(idx, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


def run_lm_eval(run: str, tasks: list[str], include_path: str | None = None, *, device: str = "auto", dtype: str = "fp32",
                limit: int | None = None, batch_size: int = 16, max_length: int | None = None, lm: EngineLM | None = None) -> dict:
    """``lm_eval.simple_evaluate`` on a run; returns the harness's results dict (``results[task][metric]``)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from steplab.errors import StepLabError

    manager = None
    if include_path:  # indexing the harness's own ~10k task YAMLs takes a minute: skip it when the folder has them all
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if not all(manager.match_tasks([t]) for t in tasks):
            manager = None
    manager = manager or TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:  # before the model loads: a typo fails in a second
        raise StepLabError(f"unknown lm-eval task(s) {', '.join(unknown)}; list them with `lm_eval ls tasks`"
                           + ("" if include_path else " or pass --include-path DIR for your own task YAMLs"))
    model = SteplabLM(run=run, device=device, dtype=dtype, batch_size=batch_size, max_length=max_length, lm=lm)
    try:
        return simple_evaluate(model=model, tasks=tasks, task_manager=manager, limit=limit, log_samples=False)
    finally:
        if lm is None:
            model.lm.close()

