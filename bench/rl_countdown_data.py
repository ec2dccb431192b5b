"""Task text for pretraining a starting model on a task's format: one document per train problem, the prompt
followed by its reference answer (``prompt + " " + answer``), as a .jsonl for ``steplab data prepare``.

    python bench/rl_countdown_data.py --task countdown3 --n 20000 --out /tmp/i16/cd3.jsonl
"""
from __future__ import annotations

import argparse
import json

from steplab.tasks import get_task
from steplab.utils import atomic_write_text


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="countdown3")
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    items = get_task(a.task).items("train", a.n, a.seed)
    atomic_write_text(a.out, "".join(json.dumps({"text": f"{it.prompt} {it.answer}"}) + "\n" for it in items))
    print(f"wrote {len(items)} documents to {a.out}")


if __name__ == "__main__":
    main()
