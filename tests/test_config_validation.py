"""Every config field declares its valid range; values outside it (NaN and infinities included) get one-line
errors naming the field and the range, values inside it pass the range check (property-based, hypothesis)."""
from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steplab.config import CHOICES, RANGES, RunConfig, check_ranges, config_fields, resolve
from steplab.errors import ConfigError

# paths; ckpt_at (comma-separated steps, parsed by the trainer); registry names, checked against their registry
# when the run starts (model.family in models/__init__.py, data.kind in train/data.py); chat data's field/paths
FREE_TEXT = {"data.path", "train.init_from", "train.ckpt_at", "model.family", "data.kind", "data.chat.field",
             "data.chat.tokenizer", "data.chat.mix_path", "model.video.vae_run",
             "data.chat.tasks"}  # "task=weight,...", parsed (with errors naming the task) by data/conversations.py


def test_every_field_declares_its_range():
    for path, value in config_fields(RunConfig()):
        if isinstance(value, bool) or path in FREE_TEXT:
            continue
        assert path in RANGES or path in CHOICES, f"{path} declares no valid range (add it to RANGES or CHOICES in config.py)"


def _is_int(path: str) -> bool:
    return isinstance(dict(config_fields(RunConfig()))[path], int)


@st.composite
def outside(draw):
    """(field, a value just or far outside its range)."""
    path = draw(st.sampled_from(sorted(RANGES)))
    r, is_int = RANGES[path], _is_int(path)
    sides = [s for s in ("below", "above") if (r.lo if s == "below" else r.hi) is not None]
    if not is_int:
        sides.append("nonfinite")
    side = draw(st.sampled_from(sides))
    if side == "nonfinite":
        return path, draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    if is_int:
        k = draw(st.integers(0, 10**6))
        return path, (int(r.lo) - 1 - k if side == "below" else int(r.hi) + 1 + k)
    if side == "below":
        edge, beyond = r.lo, st.floats(-1e12, r.lo, exclude_max=True, allow_nan=False)
        open_end = r.lo_open
    else:
        edge, beyond = r.hi, st.floats(r.hi, 1e12, exclude_min=True, allow_nan=False)
        open_end = r.hi_open
    return path, draw(st.just(edge) | beyond if open_end else beyond)  # an open end is itself outside


@st.composite
def inside(draw):
    """(field, a value inside its range, its closed ends included)."""
    path = draw(st.sampled_from(sorted(RANGES)))
    r = RANGES[path]
    if _is_int(path):
        lo = int(r.lo) if r.lo is not None else -10**6
        hi = int(r.hi) if r.hi is not None else lo + 10**6
        return path, draw(st.sampled_from([lo, hi]) | st.integers(lo, hi))
    lo = r.lo if r.lo is not None else -1e6
    hi = r.hi if r.hi is not None else 1e6
    ends = ([] if r.lo_open else [lo]) + ([] if r.hi_open or r.hi is None else [hi])
    return path, draw(st.sampled_from(ends or [(lo + hi) / 2]) | st.floats(lo, hi, exclude_min=r.lo_open,
                                                                            exclude_max=r.hi_open, allow_nan=False))


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(outside())
def test_out_of_range_values_are_refused_naming_field_and_range(case):
    path, value = case
    with pytest.raises(ConfigError) as e:
        resolve("step1-nano", overrides=[f"{path}={value!r}"])
    msg = str(e.value)
    assert "\n" not in msg and path in msg
    if math.isfinite(value) and not (_is_int(path) and isinstance(value, float)):
        assert str(RANGES[path]) in msg


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(inside())
def test_in_range_values_pass_the_range_check(case):
    path, value = case
    try:
        cfg = resolve("step1-nano", overrides=[f"{path}={value!r}"])
    except ConfigError as e:  # only a rule between fields may refuse it (e.g. n_head must divide d_model)
        assert "out of range" not in str(e), str(e)
    else:
        check_ranges(cfg)


def test_zero_means_something_where_documented():
    cfg = resolve("step1-nano", overrides=["train.grad_clip=0", "train.threads=0", "model.moe.n_experts=0",
                                           "train.keep_last=0", "model.vocab_size=0"])
    assert cfg.train.grad_clip == 0 and cfg.model.moe.n_experts == 0
    cfg = resolve("step1-nano", overrides=["model.n_kv_head=0", "model.d_ff=0"])
    assert cfg.model.n_kv_head == cfg.model.n_head and cfg.model.d_ff == 384  # the defaults they stand for


def test_eval_every_zero_is_a_one_line_cli_error(capsys):
    from steplab.cli import main

    assert main(["train", "--preset", "step1-nano", "--set", "train.eval_every=0", "--out", "/nonexistent/never"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.eval_every=0" in err and "[1, inf)" in err
