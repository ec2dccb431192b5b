"""Interop verbs: `steplab export hf RUN OUT` and `steplab import hf DIR --out RUN`."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="export a run to another format").add_subparsers(dest="export_verb", metavar="<format>")
    export.required = True
    p = export.add_parser("hf", help="Hugging Face directory loadable by transformers (AutoModelForCausalLM), vLLM, SGLang")
    p.add_argument("run")
    p.add_argument("out")
    p.add_argument("--checkpoint", help="a specific checkpoint directory (default: the latest)")
    p.set_defaults(func=cmd_export_hf)

    imp = sub.add_parser("import", help="import a model from another format").add_subparsers(dest="import_verb", metavar="<format>")
    imp.required = True
    p = imp.add_parser("hf", help="Llama-architecture Hugging Face directory -> steplab run directory")
    p.add_argument("dir")
    p.add_argument("--out", required=True, help="new run directory; continue training with --set train.init_from=OUT")
    p.set_defaults(func=cmd_import_hf)


def cmd_export_hf(args) -> int:
    from steplab.export.hf import export_hf

    out = export_hf(args.run, args.out, checkpoint=args.checkpoint)
    print(f"wrote {out} (config.json, model.safetensors, tokenizer, generation_config.json)")
    return 0


def cmd_import_hf(args) -> int:
    from steplab.data.chat import end_id
    from steplab.data.tokenizer import Tokenizer
    from steplab.export.hf import import_hf

    out = import_hf(args.dir, args.out)
    tok = Tokenizer.load(out / "tokenizer")
    if tok.steplab_layout:
        print(f"tokenizer: steplab's own ({tok.vocab_size} tokens)")
    else:
        end = end_id(tok)
        names = ", ".join(f"{k} {tok.token(i)!r} (id {i})" for k, i in
                          (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)))
        print(f"tokenizer: its own ({tok.vocab_size} tokens): {names}; chat template kept, a reply stops at "
              + (f"{tok.token(end)!r} (id {end}) or eos" if end is not None else "eos"))
    print(f"wrote run directory {out}; to continue training, tokenize data with its tokenizer and branch from it:\n"
          f"  steplab data prepare --source SOURCE --tokenizer {out}/tokenizer --out DATA\n"
          f"  steplab train --config {out}/config.json --data DATA --set train.init_from={out} --out NEW_RUN")
    return 0
