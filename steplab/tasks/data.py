"""Where the shared standard data sets live (GSM8K, WikiText-2, TinyStories): ``$STEPLAB_SHARED/data``, else
``../shared/data`` beside the repository (the variable, when set, is the only place looked at). Tasks built on
them say they are unavailable when it is absent."""
from __future__ import annotations

import os
from pathlib import Path


def shared_data(rel: str) -> Path | None:
    if os.environ.get("STEPLAB_SHARED"):
        roots = [Path(os.environ["STEPLAB_SHARED"])]
    else:
        roots = [Path(__file__).resolve().parents[2].parent / "shared", Path.cwd().parent / "shared"]
    for root in roots:
        if (root / "data" / rel).exists():
            return root / "data" / rel
    return None
