"""`steplab law ...` verbs (filled in by the scaling-law lab)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    law = sub.add_parser("law", help="scaling-law lab: hparams, fit, plan, sweep, report")
    law.add_subparsers(dest="law_verb", metavar="<law-verb>").required = True
