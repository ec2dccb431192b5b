"""``python -m steplab.eval.lm_eval_cli --model steplab --model_args run=DIR --tasks ...``: lm-evaluation-harness's
own command line with the ``steplab`` model registered, with no set-up step. Plain ``lm_eval --model steplab``
works once ``python -m steplab.eval.lm_eval_plugin install`` has run (``make install`` runs it)."""
from __future__ import annotations

import steplab.eval.harness  # noqa: F401  (registers the model)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
