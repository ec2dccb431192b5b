"""Registers the ``steplab`` model with lm-evaluation-harness once the harness imports its model table.

The one line of ``steplab-lm-eval.pth`` (written by ``steplab.eval.lm_eval_plugin``) calls :func:`install_hook`
at interpreter start; this module is kept apart from that command so ``python -m steplab.eval.lm_eval_plugin``
does not run a module the start-up line has already imported.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

TARGET = "steplab.eval.harness:SteplabLM"


def register() -> None:
    from lm_eval.api.registry import model_registry

    if "steplab" not in model_registry:
        model_registry.register("steplab", target=TARGET)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``lm_eval.models`` is about to load, it wraps that module's loader so the
    steplab placeholder is registered right after the harness's own table."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "lm_eval.models":
            return None
        sys.meta_path.remove(self)  # one shot; and find_spec below must not find this finder again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            register()

        spec.loader.exec_module = exec_module
        return spec


def install_hook() -> None:
    if "lm_eval.models" in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
