"""Whether a run trains through ``torch.compile``: ``train.compile`` = true | false | auto.

``auto`` compiles when the run is long enough to repay the compile. On CPU a cold compile (empty inductor cache)
of a quickstart-sized Step-1 costs ~20-30 s and saves ~35-60 ms per step at 33k-0.9M parameters
(bench/tiny_step.py, docs/benchmarks.md "Issue 13, second session"), so it pays from ~500-700 steps;
``COMPILE_MIN_STEPS`` keeps a margin for two sweep workers compiling on two cores at once. Larger models repay it
sooner (their steps are longer), so the rule is conservative there.

The decision depends on the config alone (never on timing or on what is in a cache), because a compiled step
rounds differently from an eager one: the same config must train the same bits. It is the total
``train.max_steps``, not the steps left, so a resumed run, a WSD branch (``init_state``) and an independent run
of the same length choose alike. The resolved value is written into the run's config.json (``train.compile``
becomes ``true`` or ``false``); a resume with ``auto`` keeps what the run chose.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from steplab.config import RunConfig

COMPILE_MIN_STEPS = 1000


def c_compiler() -> str | None:
    """The C++ compiler inductor's CPU backend would call, when one is on PATH."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def resolve_compile(cfg: RunConfig, device_type: str, saved_config: Path | None = None) -> tuple[bool, str]:
    """(compile?, why) for ``cfg.train.compile``; ``saved_config``: the config.json of the run being resumed."""
    choice = cfg.train.compile
    if choice != "auto":
        return choice == "true", f"train.compile={choice}"
    if saved_config is not None and saved_config.is_file():
        saved = json.loads(saved_config.read_text()).get("train", {}).get("compile", False)
        saved = {True: "true", False: "false"}.get(saved, saved)
        if saved in ("true", "false"):
            return saved == "true", f"auto: as this run chose when it started (train.compile={saved})"
    m = cfg.model
    if m.family not in ("", "step1", "step2") or m.moe.n_experts > 0 or cfg.data.kind != "tokens":
        return False, "auto: only dense Step-1 on token shards is measured; set train.compile=true to try"
    if m.doc_mask_token >= 0:  # per-batch document spans: a new graph for every batch's layout
        return False, "auto: document masking (model.doc_mask_token) changes the graph every batch"
    if device_type == "cpu" and c_compiler() is None:
        return False, "auto: no C++ compiler on PATH for torch.compile's CPU backend"
    steps = cfg.train.max_steps
    if steps < COMPILE_MIN_STEPS:
        return False, f"auto: {steps} steps < {COMPILE_MIN_STEPS}, too short to repay the compile"
    return True, f"auto: {steps} steps >= {COMPILE_MIN_STEPS} repay the compile"
