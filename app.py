"""Small LLM Lab: chat with small open LLMs on an 8 GB GPU (or no GPU at all).

    python app.py                         # the web app, with the embedded offline model
    python app.py --ask "Hi" [--model ID|PATH] [--quant none|bf16|8bit|4bit] ...   # one answer, headless
    python app.py --compare MODEL:QUANT MODEL:QUANT --prompts prompts/quick_en --out results.csv   # batch, headless
    python app.py --api [--api-key KEY]  # the web app plus an OpenAI-compatible API at /v1 (api/)

UI and CLI wiring only: the engine (models/engine.py) does the work for both.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import threading
from pathlib import Path

# Library messages a user cannot act on, silenced before those libraries load (their loggers exist by name
# before the import): torchao's "Failed to load …/_C_mxfp8….so" for kernels of other GPUs, torch's _pytree
# deprecation warnings that torchao triggers, and bitsandbytes' CPU hint to "pip install kernels" (that
# package downloads code at run time: not something to follow). Errors still get through.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops")
for _name in QUIET_LOGGERS:
    logging.getLogger(_name).setLevel(logging.ERROR)

import torch  # noqa: E402

from api.auth import is_loopback
from models.facade import (
    APP_TEMPERATURE, APP_TOP_P, Engine, GiB, KVPrecision, LoadOptions, LoadSettings, Quant, SamplingSettings,
    UserFacingError, default_cache_dir, default_model_roots, engine_metrics, file_logger, format_cache_report,
    internal_error, is_remote, load_catalog, ModelRoots, parse_quant, quiet_weight_loading_bar, sampling_defaults,
    served_by,
)

MIN_CONTEXT, MAX_CONTEXT = 128, 1 << 20
AUTH_ENV = "SMALLCHAT_AUTH"
MAX_MESSAGE_CHARS = 50_000  # the UI's default too (ui/handlers.py); ~12k tokens, a third of the largest context

TRUST_WARNING = (
    "WARNING: --trust-remote-code runs Python code downloaded with the model. "
    "Use it only for models whose code you have read or trust."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options for both the server and the headless --ask mode."""
    p = argparse.ArgumentParser(description="Chat with small open LLMs on a consumer GPU.")
    p.add_argument("--ask", metavar="QUESTION", help="answer one question headless, print it with metrics, and exit")
    p.add_argument("--cache-report", action="store_true", help="print what the cache folder holds, part by part, and exit")
    p.add_argument("--model", default="", help="catalog id, local folder, .gguf file, hub id, or a running "
                   "OpenAI-compatible server openai:http://HOST:PORT/v1[#NAME] (default: the embedded model)")
    p.add_argument("--quant", default="none", choices=[q.value for q in Quant],
                   help="weights precision: none (fp16 on GPU, fp32 on CPU) | bf16 | 8bit | 4bit (bitsandbytes nf4) | "
                        "int4 (our int4 Triton kernels + CUDA-graph decoder, the fast path; NVIDIA sm80+) (default: none)")
    p.add_argument("--double-quant", action="store_true", help="4-bit: also quantize the quantization constants")
    p.add_argument("--gpu-budget", type=float, metavar="GiB", help="VRAM this app may use (default: free VRAM minus 0.5 GiB)")
    p.add_argument("--context", type=int, default=4096, metavar="TOKENS", help="context length to plan memory for")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the model's recommended value: its "
                   "generation_config.json, else models/catalog.toml, else 0.7)")
    p.add_argument("--top-p", type=float, help="(default: the model's recommended value, else 0.9)")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--kv", choices=[k.value for k in KVPrecision], default=KVPrecision.FULL.value,
                   help="KV cache precision: full, fp8 (half the memory) or offload (CPU RAM; CUDA only)")
    p.add_argument("--accelerate-offload", dest="stream_offload", action="store_false",
                   help="copy fp16/bf16 layers offloaded to CPU RAM when called (accelerate's hooks) instead of "
                        "page-locking them and prefetching a layer ahead (the default: 6.5x faster on an H200)")
    p.add_argument("--system", default="", metavar="TEXT", help="system prompt")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the download to run (off by default: it is arbitrary code)")
    p.add_argument("--compare", nargs="+", metavar="MODEL[:QUANT]",
                   help="run a prompt set through these configurations headless (e.g. smollm2-135m-instruct:none "
                        "smollm2-135m-instruct:4bit), print the table and exit; needs --prompts")
    p.add_argument("--prompts", metavar="PATH", help="prompt set for --compare: a .toml file or a set name in prompts/")
    p.add_argument("--out", metavar="PATH", help="--compare: write the results as CSV here (and a .jsonl beside it)")
    p.add_argument("--host", default="127.0.0.1",
                   help="where the web app listens; anything but loopback needs --auth (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", metavar="USER:PASS",
                   help=f"password for the web app (or set {AUTH_ENV}=USER:PASS, which keeps it out of the process list); "
                        "required with a --host other than loopback and with --share")
    p.add_argument("--share", action="store_true",
                   help="also publish the app through a public gradio.live link (off unless given; needs --auth)")
    p.add_argument("--model-root", action="append", metavar="DIR",
                   help="when the app is exposed (--host not loopback, or --share), local model paths must lie under "
                        "one of these folders (repeatable; default: the app's model caches and the embedded model)")
    p.add_argument("--max-message-chars", type=int, default=MAX_MESSAGE_CHARS, metavar="N",
                   help=f"longest chat message accepted, in characters (default: {MAX_MESSAGE_CHARS:,})")
    api = p.add_argument_group("OpenAI-compatible API (/v1, same engine and queue as the web UI)")
    api.add_argument("--api", action="store_true", help="also serve /v1/models and /v1/chat/completions")
    api.add_argument("--api-only", action="store_true", help="serve only the API, without the web UI")
    api.add_argument("--api-key", metavar="KEY", help="key clients must send as 'Authorization: Bearer KEY' "
                     "(default: $SMALLCHAT_API_KEY; required when --host is not a loopback address)")
    api.add_argument("--api-allow-load", action="store_true",
                     help="let a request with the API key name a catalog model that is not in memory, loading it "
                          "(it may unload other users' idle models; needs --api-key)")
    api.add_argument("--api-max-waiting", type=int, default=8, metavar="N",
                     help="API requests that may wait for their turn; more get 503 + Retry-After (default: 8)")
    args = p.parse_args(argv)
    args.auth = args.auth or os.environ.get(AUTH_ENV) or None
    if args.auth is not None and not re.fullmatch(r"[^:]+:.+", args.auth, flags=re.S):
        p.error(f"--auth / {AUTH_ENV} must be USER:PASS (a user name, a colon, a password)")
    if args.auth is None and not is_loopback(args.host) and not args.api_only:  # --api-only: the API key guards it
        p.error(f"--host {args.host} makes the app reachable from other machines, where anyone could switch the "
                f"model and read the chats: give --auth USER:PASS (or set {AUTH_ENV}=USER:PASS)")
    if args.share and args.auth is None:
        p.error(f"--share publishes the app on a public link: give --auth USER:PASS (or set {AUTH_ENV}=USER:PASS)")
    for folder in args.model_root or []:
        if not Path(folder).expanduser().is_dir():
            p.error(f"--model-root {folder}: no such folder")
    if args.max_message_chars < 1:
        p.error("--max-message-chars must be at least 1")
    args.quant = parse_quant(args.quant)
    if args.gpu_budget is not None and args.gpu_budget <= 0:
        p.error("--gpu-budget must be a positive number of GiB")
    if not MIN_CONTEXT <= args.context <= MAX_CONTEXT:
        p.error(f"--context must be between {MIN_CONTEXT} and {MAX_CONTEXT} tokens")
    if args.double_quant and args.quant is not Quant.NF4:
        p.error("--double-quant goes with --quant 4bit (it shrinks nf4's quantization constants)")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    if args.temperature is not None and args.temperature < 0:
        p.error("--temperature must be 0 (greedy) or more")
    if args.compare is not None:
        from compare.runner import parse_spec

        if args.ask is not None:
            p.error("--ask and --compare are separate modes: give one of them")
        if not args.prompts:
            p.error("--compare needs --prompts PATH (a .toml prompt set, e.g. prompts/quick_en.toml)")
        try:
            args.compare = [parse_spec(text) for text in args.compare]
        except UserFacingError as e:
            p.error(f"--compare: {e}")
        if args.kv != KVPrecision.FULL.value:
            p.error("--kv applies to --ask and the app; --compare runs with a full-precision KV cache")
    elif args.prompts or args.out:
        p.error("--prompts and --out go with --compare MODEL[:QUANT] ...")
    args.api_key_value = None
    if args.api or args.api_only:
        from api.auth import ApiKeyMissing, api_key_for

        if args.ask is not None or args.compare is not None:
            p.error("--api/--api-only serve the app: they do not go with --ask or --compare")
        if args.api_max_waiting < 0:
            p.error("--api-max-waiting must be 0 or more")
        try:
            args.api_key_value = api_key_for(args.host, args.api_key)
        except ApiKeyMissing as e:
            p.error(str(e))
        if args.api_allow_load and args.api_key_value is None:
            p.error("--api-allow-load lets API callers load models: give --api-key KEY (or set SMALLCHAT_API_KEY) "
                    "so only callers with the key can; anonymous callers never load or unload models")
    return args


def launch_options(args: argparse.Namespace) -> tuple[dict, str]:
    """launch() arguments for where and how the app is served, and the line that says so (never the password)."""
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    where = f"http://{args.host}:{args.port}"
    if auth:
        notice = (f"serving {where} with a password (user {auth[0]!r})"
                  + ("; also on a public gradio.live link (--share)" if args.share else ""))
    else:
        notice = f"serving {where} (this machine only; no password)"
    options = {"server_name": args.host, "server_port": args.port, "share": bool(args.share), "auth": auth}
    return options, notice


class CliError(Exception):
    """A command-line problem the user can fix (e.g. an --out folder that cannot be written)."""


def load_options(args: argparse.Namespace) -> LoadOptions:
    """The load switches from the command line (the same for every load the app makes)."""
    return LoadOptions(trust_remote_code=args.trust_remote_code, stream_offload=args.stream_offload)


def model_roots_for(args: argparse.Namespace, catalog) -> ModelRoots | None:
    """Folders local model paths are confined to when the app is exposed; None (any path) on loopback."""
    if is_loopback(args.host) and not args.share:
        return None
    return ModelRoots.of(args.model_root or default_model_roots(default_cache_dir(), catalog))


def load_settings(args: argparse.Namespace) -> LoadSettings:
    """LoadSettings from the command line."""
    return LoadSettings.from_user(args.quant, args.gpu_budget, args.context, args.double_quant, load_options(args))


def _progress(fraction: float, message: str) -> None:
    print(f"[{fraction:4.0%}] {message}", file=sys.stderr, flush=True)


def run_ask(args: argparse.Namespace, engine: Engine) -> int:
    """Answer one question: the answer on stdout, load and answer metrics on stderr."""
    if not args.ask.strip():
        print("error: --ask needs a non-empty question", file=sys.stderr)
        return 2
    report = engine.load(args.model, load_settings(args), progress=_progress)
    loaded = report.loaded
    remote = served_by(loaded) is not None
    if remote:
        print(f"model: {loaded.ref.location}, checked in {loaded.load_seconds:.1f} s; {loaded.plan.message}",
              file=sys.stderr)
    else:
        print(f"model: {loaded.ref.label} ({args.quant.value}, {loaded.dtype}) on {loaded.device}, "
              f"loaded in {loaded.load_seconds:.1f} s; {loaded.plan.message}", file=sys.stderr)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.ask}
    ]
    recommended = sampling_defaults(getattr(loaded.model, "generation_config", None), loaded.ref.entry)
    temperature = recommended.temperature if args.temperature is None else args.temperature
    top_p = recommended.top_p if args.top_p is None else args.top_p
    source = {"generation_config": "the model's generation_config.json", "catalog": "models/catalog.toml",
              "app": "the app's defaults"}[recommended.source]
    given = [name for name, value in (("temperature", args.temperature), ("top-p", args.top_p)) if value is not None]
    print(f"sampling: temperature {temperature:g}, top-p {top_p:g} "
          f"({'command line: ' + ', '.join(given) + '; rest from ' if given else 'from '}{source})", file=sys.stderr)
    sampling = SamplingSettings(args.max_new_tokens, temperature, top_p, args.seed)
    printed = ""
    update = None
    for update in engine.chat(messages, sampling, threading.Event(), kv=args.kv):
        sys.stdout.write(update.text[len(printed):])
        sys.stdout.flush()
        printed = update.text
    print()
    stats = update.stats
    if remote:
        metrics = engine_metrics(loaded)
        kv = f"; engine KV cache {metrics.kv_cache_usage:.1%} used" if metrics and metrics.kv_cache_usage is not None else ""
        print(f"metrics: {stats.summary()}; prompt {stats.prompt_tokens} tokens; total {stats.total_s:.2f} s; "
              f"memory: the remote engine's{kv}", file=sys.stderr)
        return 0
    memory = engine.memory()
    print(
        f"metrics: {stats.summary()}; prompt {stats.prompt_tokens} tokens; total {stats.total_s:.2f} s; "
        f"weights {loaded.weights_bytes / GiB:.2f} GiB; peak {stats.peak_bytes / GiB:.2f} GiB "
        f"({memory.device_name})",
        file=sys.stderr,
    )
    return 0


def run_compare(args: argparse.Namespace, engine: Engine) -> int:
    """Run a prompt set through each configuration: progress on stderr, the table on stdout, CSV + JSONL to --out."""
    from compare.export import format_table, write_both
    from compare.prompt_sets import load_prompt_set
    from compare.runner import run_batch, summarize

    if args.out:  # fail now, not after a long batch
        folder = Path(args.out).resolve().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CliError(f"--out: cannot create {folder} ({e.strerror or e})") from None
        if not os.access(folder, os.W_OK):
            raise CliError(f"--out: cannot write into {folder} (read-only)")
    prompt_set = load_prompt_set(args.prompts)
    if args.system:
        prompt_set = dataclasses.replace(prompt_set, system=args.system)
    available = {o.quant for o in engine.quant_options() if o.available}
    for spec in args.compare:
        engine.resolve(spec.model)  # an unknown model fails here, before any loading
        if spec.quant not in available and not is_remote(spec.model):
            raise UserFacingError("quant_not_here", label=spec.label, quant=spec.quant.value)
    base = dataclasses.replace(load_settings(args), quant=Quant.NONE)
    # One seed for every configuration, so sampled answers differ only by the model and quantization.
    # One sampling for every configuration (not each model's own recommendation), so answers differ only by
    # the model and quantization.
    temperature = APP_TEMPERATURE if args.temperature is None else args.temperature
    top_p = APP_TOP_P if args.top_p is None else args.top_p
    sampling = SamplingSettings(args.max_new_tokens, temperature, top_p, 0 if args.seed is None else args.seed)
    print(f"{prompt_set.name}: {len(prompt_set.questions)} questions × {len(args.compare)} configurations",
          file=sys.stderr)
    rows = []
    for event in run_batch(engine, prompt_set, args.compare, sampling, base=base):
        if event.row is None:
            print(event.message, file=sys.stderr, flush=True)
            continue
        rows.append(event.row)
        r = event.row
        state = f"error: {r.error}" if r.error else f"{r.new_tokens} tokens, TTFT {r.ttft_s} s, {r.tokens_per_s} tok/s"
        swap = f" (unloaded {r.swapped_out} to load it)" if r.swapped_out else ""
        print(f"[{event.done}/{event.total}] {r.config} question {r.question_no}: {state}{swap}", file=sys.stderr, flush=True)
    print(format_table(rows))
    print()
    for s in summarize(rows):
        print(f"{s['config']}: score {s['score']}, TTFT {s['ttft_s']} s, {s['tokens_per_s']} tok/s, "
              f"weights {s['weights_mib']} MiB, {s['errors']} errors")
    if args.out:
        csv_path, jsonl_path = write_both(rows, args.out)
        print(f"wrote {csv_path} and {jsonl_path}", file=sys.stderr)
    failed = [r for r in rows if r.error]
    if failed:
        print(f"error: {len(failed)} of {len(rows)} answers failed; first: {failed[0].config}: {failed[0].error}",
              file=sys.stderr)
        return 1
    return 0


def _api_app(args: argparse.Namespace, engine: Engine):
    """The /v1 app for --api/--api-only, or None."""
    if not (args.api or args.api_only):
        return None
    from api.server import build_api, log_to_stderr
    from api.service import ApiSettings

    log_to_stderr()
    settings = ApiSettings(allow_load=args.api_allow_load, max_waiting=args.api_max_waiting,
                           default_max_tokens=args.max_new_tokens, load_settings=load_settings(args),
                           kv=KVPrecision(args.kv))
    return build_api(engine, settings, args.api_key_value)


def serve(args: argparse.Namespace, engine: Engine) -> int:
    """Start the web app (and/or the API) with the chosen model preloaded."""
    from models.facade import limit_malloc_arenas
    from ui.layout import UiDefaults, build_demo, launch_kwargs

    limit_malloc_arenas()  # before the server's threads allocate: per-thread arenas made RSS climb per answer
    try:
        engine.load(args.model, load_settings(args), progress=_progress)
    except UserFacingError as e:  # the app still starts: the user can pick another model in the UI
        print(f"error: {e}", file=sys.stderr)
    api_app = _api_app(args, engine)
    if args.api_only:
        from api.server import standalone_app, uvicorn_server

        print(f"API at http://{args.host}:{args.port}/v1", file=sys.stderr)
        uvicorn_server(standalone_app(api_app), args.host, args.port).run()
        return 0
    defaults = UiDefaults(
        model=args.model, quant=args.quant.value, gpu_budget_gib=args.gpu_budget, context_tokens=args.context,
        system_prompt=args.system, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
        kv=args.kv,
    )
    demo = build_demo(engine, defaults, load_options(args), max_message_chars=args.max_message_chars)
    options, notice = launch_options(args)
    app_kwargs = None
    if api_app is not None:
        from api.server import gradio_app_kwargs

        app_kwargs = gradio_app_kwargs(api_app)
        print(f"API at http://{args.host}:{args.port}/v1", file=sys.stderr)
    print(notice, file=sys.stderr, flush=True)
    if engine.model_roots is not None:
        print("local model paths only from under: " + ", ".join(map(str, engine.model_roots.folders)),
              file=sys.stderr, flush=True)
    demo.queue(default_concurrency_limit=None).launch(**options, **launch_kwargs(demo, app_kwargs))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: headless answer with --ask, headless batch with --compare, else the web app."""
    args = parse_args(argv)
    if args.cache_report:
        print(format_cache_report(default_cache_dir()))
        return 0
    quiet_weight_loading_bar()
    if args.trust_remote_code:
        print(TRUST_WARNING, file=sys.stderr)
    catalog = load_catalog()
    engine = Engine(catalog, model_roots=model_roots_for(args, catalog))
    try:
        if args.compare is not None:
            return run_compare(args, engine)
        return run_ask(args, engine) if args.ask is not None else serve(args, engine)
    except (UserFacingError, CliError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError as e:
        print(f"error: out of memory: {str(e).splitlines()[0] if str(e) else e}. Lower --context or --gpu-budget's "
              "other users, or pick a smaller --quant.", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a bug: its traceback goes to a log file, the user gets its id
        log_path = engine.cache_dir / "logs" / "errors.log"
        print(f"error: {internal_error(e, 'command line', file_logger(log_path))} ({log_path})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
