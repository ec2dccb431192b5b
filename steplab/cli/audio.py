"""Speech verbs, reached from the shared ones: `tokenizer train --audio`, `data prepare --speech-tokenizer`,
`eval --task asr|tts`. Argument handling and printing only; the work is in data/speech*.py and eval/speech.py."""
from __future__ import annotations

import argparse
import json


def add_tokenizer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speech (--audio)")
    g.add_argument("--audio", action="store_true",
                   help="train the dual-codebook speech tokenizer instead (--source fsdd[:PATH] | espeak | fsdd+espeak)")
    g.add_argument("--semantic-codes", type=int, default=512, help="k-means codes of the 16.7 Hz semantic stream")
    g.add_argument("--semantic-features", choices=["mfcc20d", "logmel"], default="mfcc20d",
                   help="what the semantic k-means clusters: normalised MFCCs + deltas (default) or log-mel")
    g.add_argument("--codebooks", type=int, default=2, help="residual codebooks of the 25 Hz acoustic stream")
    g.add_argument("--codebook-size", type=int, default=256)
    g.add_argument("--steps", type=int, default=6000, help="acoustic autoencoder training steps (6,000: ~3 min on one thread)")
    g.add_argument("--codec-loss", choices=["mse", "l1"], default="mse", help="acoustic autoencoder reconstruction loss")
    g.add_argument("--codec-dim", type=int, default=128, help="acoustic autoencoder conv channels")
    g.add_argument("--codec-latent", type=int, default=32, help="acoustic autoencoder quantised vector size")
    g.add_argument("--holdout-speaker", help="leave this speaker out (its clips are the test set)")
    g.add_argument("--tok-augment", type=int, default=0, metavar="N",
                   help="also fit both streams on N perturbed renderings of every training clip (default 0: off)")
    g.add_argument("--tok-warp", type=float, default=0.0, metavar="W",
                   help="--tok-augment renderings also get a frequency shift in [1/(1+W), 1+W] (as data prepare --warp)")


def add_prepare_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speech")
    g.add_argument("--speech-tokenizer", metavar="DIR", help="prepare ASR+TTS token data from --source speech with this speech tokenizer")
    g.add_argument("--seq-len", type=int, default=256, help="speech: window length the documents are packed into")
    g.add_argument("--holdout-speaker", dest="speech_holdout", help="speech: leave this speaker out (val = its clips)")
    g.add_argument("--augment", type=int, default=8,
                   help="speech: extra speed-perturbed, time-shifted ASR renderings per training clip (default 8, "
                        "the measured recipe; 0: off)")
    g.add_argument("--warp", type=float, default=0.0,
                   help="speech: also shift the augmented renderings' frequencies (pitch and formants, duration kept) "
                        "by a factor in [1/(1+W), 1+W] (default 0: off)")
    g.add_argument("--tts-real-only", action="store_true",
                   help="speech: TTS documents only from recorded speech, none from espeak-ng voices (ASR keeps all)")
    g.add_argument("--speech-dev", action="store_true",
                   help="speech: val = a selection set carved from the training recordings (FSDD repetitions 5-9, "
                        "espeak take 3), left out of train; the test split stays unseen")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speech (--task asr / --task tts)")
    g.add_argument("--speech-source", default="fsdd", help="clips to evaluate on (default fsdd: its official test split)")
    g.add_argument("--eval-holdout-speaker", help="evaluate on this speaker's clips (a leave-one-speaker-out run)")
    g.add_argument("--blank-stream", choices=["semantic", "acoustic"],
                   help="--task asr ablation: replace this stream's tokens by the codes of silence")
    g.add_argument("--asr-votes", type=int, default=1,
                   help="--task asr: majority vote over the clip and N-1 speed/shift-perturbed renderings (default 1: off)")
    g.add_argument("--tts-samples", type=int, default=10, help="--task tts: sampled utterances per digit")
    g.add_argument("--tts-temperature", type=float, default=0.7, help="--task tts: sampling temperature")
    g.add_argument("--tts-candidates", type=int, default=1, metavar="K",
                   help="--task tts: best-of-K, each candidate checked by the model's own ASR (default 1: off)")
    g.add_argument("--tts-renderings", type=int, default=0, metavar="R",
                   help="--tts-candidates: the verifier also hears R speed/shift-perturbed renderings of each candidate "
                        "and accepts it only when all are the requested text (default 0: the decode alone)")
    g.add_argument("--speech-split", choices=["test", "dev"], default="test",
                   help="--task asr: the test split (default) or the selection set carved from training (choose checkpoints on dev)")
    g.add_argument("--checkpoint", metavar="DIR",
                   help="a specific checkpoint directory of the run (default: the latest); every eval but --lm-eval")


def cmd_tokenizer_train_audio(args) -> int:
    from steplab.data.speech import augmented, load_corpus, split_clips
    from steplab.data.speech_tokenizer import SpeechTokenizerConfig, reconstruction_error, train_speech_tokenizer
    from steplab.models.audio import CodecConfig

    train, test = split_clips(load_corpus(args.source), args.holdout_speaker)
    train = train + augmented(train, args.tok_augment, warp=args.tok_warp)
    cfg = SpeechTokenizerConfig(semantic_codes=args.semantic_codes, semantic_features=args.semantic_features, steps=args.steps,
                                codec=CodecConfig(n_q=args.codebooks, codebook_size=args.codebook_size, dim=args.codec_dim,
                                                  latent=args.codec_latent, recon_loss=args.codec_loss))
    print(f"{len(train)} training clips ({len(test)} held out)")
    tok = train_speech_tokenizer(train, cfg, progress=True)
    tok.save(args.out)
    rec = reconstruction_error(tok, test)
    print(json.dumps({"bitrate": tok.bitrate(), "held_out_reconstruction": rec}))
    print(f"wrote {args.out}")
    return 0


def cmd_prepare_speech(args) -> int:
    from steplab.data.speech import dev_split, load_corpus, split_clips
    from steplab.data.speech_lm import prepare_speech_data

    train, val = split_clips(load_corpus(args.source), args.speech_holdout)
    if args.speech_dev:
        train, val = dev_split(train)
    meta = prepare_speech_data(train, val, args.speech_tokenizer, args.out, text_tokenizer=args.tokenizer,
                               seq_len=args.seq_len, seed=args.seed, source=args.source, force=args.force,
                               augment=args.augment, tts_real_only=args.tts_real_only,
                               warp=args.warp)
    for split in ("train", "val"):
        s = meta[split]
        print(f"{split}: {s['clips']:,} clips, {s['documents']:,} documents, {s['tokens']:,} tokens")
    print(f"vocabulary {meta['vocab_size']:,} (audio block from id {meta['audio_base']}); wrote {args.out}")
    return 0


def wants_speech(args) -> bool:
    return bool(set(args.task) & {"asr", "tts"})


def cmd_eval_speech(args) -> int:
    from steplab.data.speech import dev_split, load_corpus, split_clips
    from steplab.eval.speech import SpeechModel, asr_accuracy, tts_intelligibility, train_digit_classifier

    unknown = set(args.task) - {"asr", "tts"}
    if unknown:
        raise SystemExit(f"error: --task asr/tts cannot be combined with {sorted(unknown)}; run them separately")
    if args.tts_candidates < 1:
        raise SystemExit(f"error: --tts-candidates must be >= 1 (best-of-K TTS), got {args.tts_candidates}")
    if args.tts_renderings < 0:
        raise SystemExit(f"error: --tts-renderings must be >= 0, got {args.tts_renderings}")
    clips = load_corpus(args.speech_source)
    train, test = split_clips(clips, args.eval_holdout_speaker)
    if args.speech_split == "dev":
        train, test = dev_split(train)
    sm = SpeechModel.from_run(args.run, device=args.device, checkpoint=args.checkpoint)
    out: dict = {"run": args.run, "step": sm.step, "source": args.speech_source, "split": args.speech_split,
                 "test_clips": len(test)}
    if "asr" in args.task:
        if args.asr_votes < 1:
            raise SystemExit(f"error: --asr-votes must be >= 1, got {args.asr_votes}")
        out["asr"] = asr_accuracy(sm, test, blank=args.blank_stream, votes=args.asr_votes)
        out["asr"]["blank_stream"] = args.blank_stream
        print(f"asr: {out['asr']['accuracy']:.1%} ({out['asr']['correct']}/{out['asr']['n']})")
    if "tts" in args.task:
        judge = train_digit_classifier(train)  # an independent classifier on real recordings
        out["tts"] = tts_intelligibility(sm, judge, args.tts_samples, seed=args.seed, temperature=args.tts_temperature,
                                         candidates=args.tts_candidates, renderings=args.tts_renderings)
        t = out["tts"]
        print(f"tts: {t['accuracy']:.1%} recognised by the independent classifier (best of {t['candidates']}, "
              f"{t['seconds_per_utterance']:.3f} s per utterance)")
    print(json.dumps(out, indent=2))
    return 0
