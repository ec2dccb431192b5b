"""``python -m steplab.eval.lm_eval_cli --model steplab --model_args run=DIR --tasks ...``: lm-evaluation-harness's
own command line with the ``steplab`` model registered, for harness versions that do not yet load model plugins
from entry points (there, plain ``lm_eval --model steplab`` works through the package's entry point)."""
from __future__ import annotations

import steplab.eval.harness  # noqa: F401  (registers the model)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
