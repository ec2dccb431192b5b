# steplab developer targets. `make test` is what CI runs (.ci/run) and what the README's second command does.
PY ?= python

.PHONY: install browser test test-all bench quickstart

install:
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m steplab.eval.lm_eval_plugin install  # plain `lm_eval --model steplab` (docs/serving.md)

# Headless Chromium for the chat-page test (Debian packages); skipped quietly where apt is unavailable.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	   echo "note: chromium/chromedriver not installed; the chat-page test will be skipped")

test: install browser
	$(PY) -m pytest -q

test-all: install browser
	$(PY) -m pytest -q -m "slow or not slow"

quickstart: install
	steplab quickstart

bench:
	$(PY) bench/kill_resume.py
	$(PY) bench/train_throughput.py
