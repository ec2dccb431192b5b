"""`steplab serve` (OpenAI-compatible API + chat page) and `steplab chat` (terminal REPL on the same engine)."""
from __future__ import annotations

import argparse
import ipaddress
import re
import socket
import sys
from pathlib import Path

from steplab.cli.core import add_dtype_arg, inference_dtype
from steplab.errors import ConfigError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DECODE_CHOICES = ["auto", "eager", "static", "compiled"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve runs over an OpenAI-compatible API with a browser chat page")
    p.add_argument("runs", nargs="+", metavar="RUN[:NAME]",
                   help="run directory, optionally with the model name clients use (default: the directory name), "
                        "e.g. runs/A:step-1-8k")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-keys-file", help="file with one API key per line (also read: $STEPLAB_API_KEYS)")
    p.add_argument("--no-auth", action="store_true", help="serve without API keys (anyone who can connect may use it)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together per model (KV-cache slots)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 503s (back-pressure)")
    p.add_argument("--rate-limit", help="per key (per address with --no-auth), e.g. 60/minute, 5/second, '600/hour;20/10 seconds'")
    p.add_argument("--auth-failure-limit", default="20/minute",
                   help="failed authentications per client address before it gets 429s (default 20/minute; 'off' disables)")
    p.add_argument("--trusted-proxy", action="append", default=[], metavar="ADDR",
                   help="reverse proxy (address or network, repeatable) whose X-Forwarded-For names the client; "
                        "default none: the connecting address is the client")
    p.add_argument("--max-request-bytes", type=int, default=1_000_000, help="larger request bodies get 413")
    p.add_argument("--max-chat-request-bytes", type=int,
                   help="the chat route's limit (default: --max-request-bytes plus room for 4 images when a model reads images)")
    p.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (default: refuse them)")
    p.add_argument("--max-len", type=int, help="context per sequence (KV-cache length; default: the model's max_seq_len)")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens prefilled per engine step (default 512)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--decode", default="auto", choices=DECODE_CHOICES,
                   help="decode step: eager (the model's forward), static (one fixed-shape step over every slot), "
                        "compiled (that step under torch.compile, compiled at start-up, before serving) or auto "
                        "(default: compiled for dense float models, else eager)")
    add_dtype_arg(p)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--video-dir", default="steplab-videos", help="video-dit runs: where /v1/videos keeps finished clips")
    p.add_argument("--video-max-bytes", type=int, default=100_000_000, help="cap on the stored clips (oldest go first)")
    p.add_argument("--video-ttl", type=int, default=3600, help="seconds a finished clip is kept")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="chat with a run in the terminal (/reset, /quit)")
    p.add_argument("run")
    p.add_argument("--system", default="", help="system message")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=256, help="longest reply")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_dtype_arg(p)
    p.set_defaults(func=cmd_chat)


def parse_run_spec(spec: str) -> tuple[str, str]:
    """``runs/A:step-1-8k`` -> ("runs/A", "step-1-8k"); ``runs/A`` -> ("runs/A", "A")."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or "/" in name or "\\" in name:
        path, name = spec, Path(spec).resolve().name
    if not NAME.match(name):
        raise ConfigError(f"model name {name!r} (from {spec!r}) must be letters, digits, '.', '_' or '-'; "
                          f"give one explicitly as RUN:NAME, e.g. {path}:step-1-8k")
    return path, name


def cmd_serve(args) -> int:
    import uvicorn

    from steplab.serve.app import create_app
    from steplab.serve.auth import ENV_VAR, load_api_keys
    from steplab.train.trainer import resolve_device

    models: dict[str, str] = {}
    for spec in args.runs:
        path, name = parse_run_spec(spec)
        if name in models:
            raise ConfigError(f"two runs are served as {name!r}; name them apart with RUN:NAME")
        models[name] = path
    if args.no_auth:
        if args.api_keys_file:
            raise ConfigError("--no-auth and --api-keys-file contradict each other; pick one")
        keys = None
    else:
        keys = load_api_keys(args.api_keys_file)
        if not keys:
            raise ConfigError(f"no API keys: pass --api-keys-file FILE (one key per line) or set {ENV_VAR}, "
                              "or serve without keys explicitly with --no-auth")
    if args.max_len is not None and args.max_len < 2:
        raise ConfigError(f"--max-len {args.max_len} leaves no room for a prompt and a reply; use at least 2")
    if args.prefill_chunk < 1 or args.max_batch < 1 or args.max_queue < 0:
        raise ConfigError("--prefill-chunk and --max-batch must be at least 1 and --max-queue at least 0")
    failure_limit = None if args.auth_failure_limit.lower() in ("off", "none", "0") else args.auth_failure_limit
    if failure_limit:
        from steplab.serve.auth import parse_rate

        parse_rate(failure_limit)  # a clear error before loading anything
    for proxy in args.trusted_proxy:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(f"--trusted-proxy {proxy!r} is not an IP address or network (e.g. 127.0.0.1, 10.0.0.0/8)") from None
    _check_port(args.host, args.port)
    videos = _video_service(models, args)
    device = resolve_device(args.device)
    app = create_app(models, api_keys=keys, rate_limit=args.rate_limit, auth_failure_limit=failure_limit,
                     trusted_proxies=args.trusted_proxy or None, max_request_bytes=args.max_request_bytes,
                     max_batch=args.max_batch, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                     max_len=args.max_len, device=device, dtype=inference_dtype(args.dtype, device),
                     max_chat_request_bytes=args.max_chat_request_bytes, allow_remote_images=args.allow_remote_images,
                     videos=videos, decode=args.decode)
    if videos is not None:
        print(f"video models {', '.join(videos.models)}: /v1/videos, files in {videos.directory} "
              f"(cap {videos.max_bytes:,} bytes, expiry {videos.ttl_s} s)")
    for name, engine in app.state.engines.items():
        print(f"model {name}: {models[name]} (context {engine.context_len} tokens, batch {engine.max_batch}, "
              f"decode {engine.decode}{' from --decode auto' if args.decode == 'auto' else ''})")
        if engine.decoder is not None and not engine.decoder.warm:  # compile now, not on the first request
            print(f"model {name}: compiling the decode step ...", flush=True)
            engine.decoder.warm_up(say=lambda msg, name=name: print(f"model {name}: {msg}", flush=True))
    url = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    print(f"chat page {url}/   API {url}/v1   auth: {'OFF (--no-auth)' if keys is None else f'{len(keys)} key(s)'}")
    if keys is None and not _is_loopback(args.host):
        print(f"warning: no authentication on {args.host}: anyone who can reach this address can use the models", file=sys.stderr)
    # proxy_headers=False: uvicorn would otherwise trust X-Forwarded-For from 127.0.0.1 on its own; the client
    # address is rewritten only for --trusted-proxy (see docs/security.md)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5,
                proxy_headers=False)
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or stop what uses it") from None


def cmd_chat(args, input_fn=input) -> int:
    from steplab.infer.engine import Engine, Request
    from steplab.infer.prompts import chat_stop_ids, encode_chat, torch_dtype
    from steplab.train.checkpoint import load_run
    from steplab.train.trainer import resolve_device

    device = resolve_device(args.device)
    _, model, tokenizer, step = load_run(args.run, device=device)
    model = model.to(torch_dtype(inference_dtype(args.dtype, device)))
    engine = Engine(model, tokenizer, name=Path(args.run).name, max_batch=1, max_queue=1).start()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    print(f"chatting with {args.run} (step {step}, context {engine.context_len} tokens); /reset clears, /quit exits")
    try:
        while True:
            try:
                line = input_fn("you> ")
            except EOFError:
                print()
                return 0
            command = line.strip()
            if command in ("/quit", "/exit"):
                return 0
            if command == "/reset":
                history = []
                print("(conversation cleared)")
                continue
            if not command:
                continue
            history.append({"role": "user", "content": line})  # plain text: typed markers stay text
            prompt = encode_chat(tokenizer, system + history)
            while len(prompt) > engine.context_len // 2 and len(history) > 1:  # forget the oldest turns
                history = history[2:] if len(history) > 2 else history[1:]
                prompt = encode_chat(tokenizer, system + history)
            room = engine.context_len - len(prompt)
            if room < 1:
                history.pop()
                print(f"(that message is {len(prompt)} tokens; the context holds {engine.context_len}: say less)")
                continue
            request = Request(prompt=prompt, max_tokens=min(args.max_tokens, room), temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed, stop_ids=chat_stop_ids(tokenizer))
            handle = engine.submit(request)
            reply = []
            print("assistant> ", end="", flush=True)
            try:
                for event in handle:
                    print(event.text, end="", flush=True)
                    reply.append(event.text)
            except KeyboardInterrupt:
                handle.cancel()
                print(" [interrupted]", end="")
            print()
            history.append({"role": "assistant", "content": "".join(reply)})
    finally:
        engine.stop()


def _video_service(models: dict[str, str], args):
    """Take the video-dit runs out of ``models`` (text engines) into a /v1/videos job service (issue 21)."""
    from steplab.infer.video import is_video_run, load_video_run

    names = [n for n, path in models.items() if is_video_run(path)]
    if not names:
        return None
    from steplab.serve.video_jobs import VideoService

    loaded = {}
    for name in names:
        path = models.pop(name)
        _, model = load_video_run(path)
        if not hasattr(model, "sample"):
            raise ConfigError(f"{path} is a video VAE run; serve a video-dit run (trained on its latents)")
        loaded[name] = model
    if args.video_max_bytes < 1 or args.video_ttl < 1:
        raise ConfigError("--video-max-bytes and --video-ttl must be at least 1")
    return VideoService(loaded, args.video_dir, max_bytes=args.video_max_bytes, ttl_s=args.video_ttl)
