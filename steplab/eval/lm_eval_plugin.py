"""Plain ``lm_eval --model steplab --model_args run=DIR`` on harness versions that load no model plugins.

lm-evaluation-harness 0.4.x builds its model registry from a fixed table in ``lm_eval/models/__init__.py`` and
reads no entry points, so a package cannot add a model to the ``lm_eval`` command by being installed. The
one hook Python offers every process is a ``.pth`` file in site-packages: ``install()`` writes one line there
(``python -m steplab.eval.lm_eval_plugin install``; ``make install`` runs it; ``remove`` takes it out). At
interpreter start the line adds a finder that waits for ``lm_eval.models`` to be imported (by the harness,
when it first looks for a model) and then registers ``steplab`` as a lazy placeholder. Nothing of steplab
beyond this module, and nothing of torch, is imported by any process that does not ask for the model.
"""
from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

PTH_NAME = "steplab-lm-eval.pth"
# One line, executed by site.py at start-up in every Python process, so it must never fail loudly: it does
# nothing when steplab is not importable, or when the steplab found first (e.g. an older checkout on
# PYTHONPATH) has no hook module.
PTH_LINE = ("import importlib.util as _u; exec(\"try:\\n import steplab.eval.lm_eval_hook as _h; _h.install_hook()"
            "\\nexcept ImportError: pass\") if _u.find_spec('steplab') else None\n")


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def install(directory: Path | None = None) -> Path:
    """Write the .pth file (atomically) into ``directory`` (default: this interpreter's site-packages)."""
    path = (directory or site_packages()) / PTH_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(PTH_LINE)
    tmp.replace(path)
    return path


def remove(directory: Path | None = None) -> Path:
    path = (directory or site_packages()) / PTH_NAME
    path.unlink(missing_ok=True)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in (["install"], ["remove"]):
        print("usage: python -m steplab.eval.lm_eval_plugin install|remove", file=sys.stderr)
        return 2
    try:
        path = install() if argv == ["install"] else remove()
    except OSError as e:
        print(f"error: cannot write {site_packages() / PTH_NAME}: {e}; run it with the permissions pip used", file=sys.stderr)
        return 1
    print(f"{'wrote' if argv == ['install'] else 'removed'} {path}: `lm_eval --model steplab --model_args run=DIR` "
          f"{'now works' if argv == ['install'] else 'is off'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
