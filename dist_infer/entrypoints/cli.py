"""The ``dist-infer`` command.

    dist-infer generate "What is the capital of France?"      answer from the embedded default model
    dist-infer generate --stream --temperature 0.7 PROMPT...   sampled, printed as tokens arrive
    dist-infer convert SRC.gguf DEST/                          a GGUF file as a Hugging Face folder
    dist-infer distill OUT/ --student SMALL/                   train SMALL on the teacher's (--model) logprobs
    dist-infer profile && dist-infer plan --workload poisson:2:100:128:64    rank tp/pp/dp layouts by simulation

Errors print one line and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys


MODEL_HELP = "Hugging Face folder, .gguf file, or 'default' (the embedded model)"


def build_parser() -> argparse.ArgumentParser:
    from dist_infer.engine.arg_utils import EngineArgs
    from dist_infer.entrypoints.openai.tool_parsers import TOOL_PARSERS

    parser = argparse.ArgumentParser(prog="dist-infer", description="Distributed LLM inference.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one or more prompts")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--presence-penalty", type=float, default=0.0,
                     help="subtracted from the logit of every token already generated, in [-2, 2]")
    gen.add_argument("--frequency-penalty", type=float, default=0.0,
                     help="times the number of times a token was generated, subtracted from its logit, in [-2, 2]")
    gen.add_argument("--min-tokens", type=int, default=0, help="generate at least this many tokens before EOS or "
                                                                "a stop string may end the answer")
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                     help="wrap each prompt in the model's chat template (default: when it has one)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    EngineArgs.add_cli_args(gen)
    gen.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    # Defaults are applied in _serve, after a --config file's server section.
    opt = functools.partial(serve.add_argument, default=argparse.SUPPRESS)
    opt("--host", help="address to bind (default: 127.0.0.1, loopback only)")
    opt("--port", type=int, help="default 8000")
    opt("--api-key", help="require this Bearer key on every route but /health (default: $DIST_INFER_API_KEY; "
                          "a key on the command line shows in ps, so prefer the variable or --api-key-file)")
    opt("--api-key-file", metavar="FILE", help="more keys, one 'name: key' a line ('#' comments); metrics and "
                                               "logs carry the key's name")
    opt("--metrics-public", action="store_true", help="serve /metrics without a key (for a scraper without one)")
    opt("--log-requests", action="store_true",
        help="log each request's prompt and completion text, with e-mail addresses, phone and card numbers, "
             "secret-looking tokens and the server's keys masked (default: no text is logged)")
    opt("--served-model-name", help="the model id clients use (default: from the path)")
    opt("--max-waiting", type=int, help="answer 429 when a request's sequences (prompts x n) would make more than "
                                        "this many wait to start; >= 1 (default: unbounded)")
    opt("--max-prompts-per-request", type=int, help="more prompts in one completions request is a 400 (default 256)")
    opt("--max-request-bytes", type=int, help="default 1 MiB")
    opt("--request-timeout", type=float, help="seconds a request's headers, and then its body, may take to arrive "
                                              "(408 after; default 30)")
    opt("--timeout-keep-alive", type=float, help="seconds an idle keep-alive connection stays open (default 5)")
    opt("--max-connections", type=int, help="open connections at most; requests beyond get 503 (default 1024)")
    opt("--ready-timeout", type=float, help="seconds /ready may take (default 30)")
    opt("--shutdown-timeout", type=float,
        help="on SIGTERM or SIGINT, seconds requests in flight may take to finish while new ones get 503; then "
             "they are cut and the server exits 0 (default 30; a second signal cuts them at once)")
    opt("--log-level", type=str.lower, choices=["critical", "error", "warning", "info", "debug"],
        help="the server's and uvicorn's log level (default warning; info adds a line per request)")
    opt("--tool-call-parser", choices=sorted(TOOL_PARSERS),
        help="how the model writes tool calls: hermes (<tool_call> JSON: Qwen2.5, Qwen3, SmolLM3, Hermes) or "
             "llama3_json (Llama 3.1 / 3.2 JSON); read for tool_choice auto")
    opt("--enable-auto-tool-choice", action="store_true",
        help="serve tool_choice auto (tools without tool_choice mean auto): the model decides whether to call, "
             "its calls read by --tool-call-parser (required; tool_choice none, required and named work "
             "without either flag)")
    opt("--name", help="also register the engine as a named Ray actor other drivers reach with get_handle(NAME)")
    EngineArgs.add_cli_args(serve)
    serve.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    batch = sub.add_parser("batch", help="run an OpenAI batch file (resumable)")
    batch.add_argument("--input", "-i", required=True, help="requests, one JSON object per line")
    batch.add_argument("--output", "-o", required=True, help="results; ids already here are skipped")
    batch.add_argument("--served-model-name", default=None)
    batch.add_argument("--max-concurrency", type=int, default=256)
    EngineArgs.add_cli_args(batch)
    batch.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    ppl = sub.add_parser("eval-ppl", help="perplexity on a fixed corpus (standard-library docstrings)")
    ppl.add_argument("model_path", nargs="?", default=None, metavar="MODEL", help="default: the embedded model")
    ppl.add_argument("--max-tokens", dest="eval_tokens", type=int, default=4096, help="corpus tokens to score")
    ppl.add_argument("--window", type=int, default=512)
    ppl.add_argument("--chunk", type=int, default=128, help="tokens fed at once (later chunks read the KV cache)")
    EngineArgs.add_cli_args(ppl)
    ppl.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    quant = sub.add_parser("quantize", help="write a weight-only quantized checkpoint")
    quant.add_argument("model_path", metavar="MODEL", help=MODEL_HELP)
    quant.add_argument("out", metavar="OUT")
    quant.add_argument("--method", choices=["int8", "int4"], required=True)
    quant.add_argument("--group-size", type=int, default=64, help="int4 group size: 32, 64 or 128")
    quant.add_argument("--algorithm", choices=["rtn", "gptq"], default="rtn",
                       help="rtn: round to nearest; gptq: correct rounding errors using calibration text")
    quant.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    prune = sub.add_parser("prune", help="write a pruned checkpoint (magnitude, 2:4 or structured heads/channels)")
    prune.add_argument("model_path", metavar="MODEL", help=MODEL_HELP)
    prune.add_argument("out", metavar="OUT")
    prune.add_argument("--method", choices=["unstructured", "2:4", "structured"], required=True)
    prune.add_argument("--sparsity", type=float, default=0.5,
                       help="fraction of weights (unstructured) or of KV groups and MLP channels (structured)")
    prune.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1,
                       help="structured: keep every shape valid for this tensor-parallel size")
    prune.add_argument("--score", choices=["wanda", "magnitude"], default="wanda",
                       help="unstructured/2:4: wanda (|weight| x input norm on built-in calibration text) or "
                            "magnitude (|weight|)")
    prune.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    from dist_infer.entrypoints.distill_cli import add_distill_parser

    add_distill_parser(sub)

    from dist_infer.entrypoints.plan_cli import add_plan_parsers

    add_plan_parsers(sub)

    conv = sub.add_parser("convert", help="convert a Llama-family GGUF file into a Hugging Face folder")
    conv.add_argument("src", metavar="SRC.gguf")
    conv.add_argument("dest", metavar="DEST")
    conv.add_argument("--overwrite", action="store_true")
    conv.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    if not debug:
        _quiet_libraries()
    try:
        commands = {"generate": _generate, "convert": _convert, "serve": _serve, "batch": _batch,
                    "eval-ppl": _eval_ppl, "quantize": _quantize, "prune": _prune, "distill": _distill,
                    "profile": _profile, "plan": _plan}
        if args.command in commands:
            return commands[args.command](args)
        parser.error(f"unknown command {args.command}")
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one clear line for users; the traceback with --debug
        if debug:
            raise
        print(f"dist-infer: error: {e}", file=sys.stderr)
        return 1
    return 0


def run_worker(argv: list[str]) -> int:
    """A non-coordinator rank under torchrun: the same engine configuration, then the worker loop."""
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    if not debug:
        _quiet_libraries()
    from dist_infer.cluster_config import engine_args_from_cli
    from dist_infer.executor.torchrun import worker_loop

    try:
        worker_loop(engine_args_from_cli(args).create_engine_config())
    except Exception as e:
        if debug:
            raise
        print(f"dist-infer: error on rank {os.environ.get('RANK')}: {e}", file=sys.stderr)
        return 1
    return 0


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    logging.getLogger().setLevel(logging.ERROR)


def _generate(args) -> int:
    from dist_infer.cluster_config import engine_args_from_cli
    from dist_infer.entrypoints.chat_utils import chat_prompt
    from dist_infer.entrypoints.llm import LLM
    from dist_infer.sampling_params import SamplingParams

    engine_args = engine_args_from_cli(args)
    # Validate sampling flags before the (slower) model load.
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                            frequency_penalty=args.frequency_penalty, min_tokens=args.min_tokens,
                            max_tokens=args.max_tokens, stop=args.stop, seed=engine_args.seed)
    with LLM(**vars(engine_args)) as llm:
        tokenizer = llm.get_tokenizer()
        use_chat = args.chat if args.chat is not None else bool(getattr(tokenizer, "chat_template", None))
        prompts = []
        for text in args.prompts:
            if use_chat:
                prompts.append(chat_prompt(tokenizer, [{"role": "user", "content": text}]))
            else:
                prompts.append(text)
        if args.stream:
            for i, prompt in enumerate(prompts):
                if i:
                    print()
                _stream_one(llm, prompt, params)
            return 0
        outputs = llm.generate(prompts, params, use_tqdm=False)
    for i, output in enumerate(outputs):
        if len(outputs) > 1:
            print(f"[{i}] ", end="")
        print(output.outputs[0].text.strip())
    return 0


def _stream_one(llm, prompt, params) -> None:
    engine = llm.engine
    request_id = engine.next_request_id()
    engine.add_request(request_id, prompt, params)
    printed = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            text = output.outputs[0].text
            sys.stdout.write(text[printed:] if printed else text.lstrip())
            sys.stdout.flush()
            printed = len(text)
    sys.stdout.write("\n")


def _model_name(served_name: str | None, model: str | None) -> str:
    from dist_infer.model_loader.resolve import DEFAULT_MODEL_NAME

    if served_name:
        return served_name
    return os.path.basename(os.path.normpath(model)) if model else DEFAULT_MODEL_NAME


def _batch(args) -> int:
    import asyncio

    from dist_infer.cluster_config import engine_args_from_cli
    from dist_infer.engine.async_llm_engine import AsyncLLMEngine
    from dist_infer.entrypoints.batch import read_requests, run_batch

    read_requests(args.input)  # a malformed input fails before the model loads
    engine_args = engine_args_from_cli(args)
    engine = AsyncLLMEngine(engine_args.create_engine_config())
    try:
        name = _model_name(args.served_model_name, engine_args.model)
        answered = asyncio.run(run_batch(engine, name, args.input, args.output, args.max_concurrency))
    finally:
        engine.shutdown()
    print(f"answered {answered} requests; results in {args.output}")
    return 0


# serve's flags (and cluster-config server keys) that are ServerSettings fields, by the field each sets.
_SETTINGS_FIELDS = {"max_waiting": "max_waiting", "max_request_bytes": "max_request_bytes",
                    "ready_timeout": "ready_timeout_s", "metrics_public": "metrics_public",
                    "log_requests": "log_requests", "max_prompts_per_request": "max_prompts_per_request",
                    "request_timeout": "request_timeout_s", "timeout_keep_alive": "keep_alive_timeout_s",
                    "max_connections": "max_connections", "shutdown_timeout": "shutdown_timeout_s",
                    "tool_call_parser": "tool_call_parser", "enable_auto_tool_choice": "enable_auto_tool_choice"}


def _serve(args) -> int:
    from dist_infer.cluster_config import engine_args_from_cli
    from dist_infer.entrypoints.openai.api_server import ServerSettings, run_server
    from dist_infer.entrypoints.openai.auth import APIKeys, startup_warnings

    engine_args = engine_args_from_cli(args)
    options = {"host": "127.0.0.1", "port": 8000, "api_key_file": None, "served_model_name": None,
               "log_level": "warning"}
    given = {}  # the config file's server section, then the flags given; the rest keep ServerSettings' defaults
    if getattr(args, "config_file", None):
        from dist_infer.cluster_config import load_cluster_config

        given.update(load_cluster_config(args.config_file).server)
    given.update({k: v for k, v in vars(args).items() if k in options or k in _SETTINGS_FIELDS})
    options.update({k: v for k, v in given.items() if k in options})
    # Keys are checked (and warnings given) before the model loads: a typo costs seconds, not a model load.
    key_on_command_line = "api_key" in vars(args)
    key, key_source = ((args.api_key, "--api-key") if key_on_command_line
                       else (os.environ.get("DIST_INFER_API_KEY"), "DIST_INFER_API_KEY"))
    keys = APIKeys.load(key, key_source, options["api_key_file"])
    settings = ServerSettings(_model_name(options["served_model_name"], engine_args.model), keys,
                              **{_SETTINGS_FIELDS[k]: v for k, v in given.items() if k in _SETTINGS_FIELDS})
    for warning in startup_warnings(options["host"], keys, key_on_command_line, options["api_key_file"]):
        print(f"dist-infer: warning: {warning}", file=sys.stderr, flush=True)
    # 1 when the engine died under the server (a supervisor should restart it), 0 after SIGTERM / SIGINT
    return run_server(engine_args, settings, options["host"], options["port"], options["log_level"],
                      getattr(args, "name", None)) or 0


def _eval_ppl(args) -> int:
    from dataclasses import asdict

    from dist_infer.cluster_config import engine_args_from_cli
    from dist_infer.eval.perplexity import perplexity

    engine_args = engine_args_from_cli(args)
    if args.model_path is not None:
        engine_args.model = args.model_path
    result = perplexity(args.eval_tokens, args.window, args.chunk, **asdict(engine_args))
    print(f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens (corpus {result['corpus']}, "
          f"window {result['window']}, chunk {result['chunk']}); weights {result['weight_bytes'] / 1e6:.1f} MB, "
          f"KV cache {result['kv_bytes_per_token'] / 1024:.1f} KiB per token")
    return 0


def _quantize(args) -> int:
    from dist_infer.compression.quantize import quantize_checkpoint

    summary = quantize_checkpoint(_model_arg(args.model_path), args.out, args.method, args.group_size,
                                  algorithm=args.algorithm)
    print(f"{summary['linears_quantized']} linear layers quantized to {args.method} ({args.algorithm}); "
          f"{summary['bytes'] / 1e6:.1f} MB written to {args.out}")
    return 0


def _model_arg(model: str) -> str | None:
    return None if model == "default" else model


def _prune(args) -> int:
    from dist_infer.compression.pruning import prune_checkpoint
    from dist_infer.model_loader.resolve import resolve_model_path

    summary = prune_checkpoint(resolve_model_path(_model_arg(args.model_path)), args.out, args.method, args.sparsity,
                               args.tp, score=args.score)
    line = f"{args.method} pruning: {summary['achieved_sparsity']:.1%} of the decoder-layer weights removed"
    if "score" in summary:
        line += f" by {summary['score']} score"
    if args.method == "structured":
        line += (f"; heads {summary['heads_before']}->{summary['heads_after']}, KV heads "
                 f"{summary['kv_heads_before']}->{summary['kv_heads_after']}, MLP channels "
                 f"{summary['intermediate_before']}->{summary['intermediate_after']}")
    print(f"{line}; written to {args.out}")
    return 0


def _distill(args) -> int:
    from dist_infer.entrypoints.distill_cli import run_distill

    return run_distill(args)


def _convert(args) -> int:
    from dist_infer.model_loader.gguf_convert import convert_gguf

    dest = convert_gguf(args.src, args.dest, overwrite=args.overwrite)
    print(dest)
    return 0


def _profile(args) -> int:
    from dist_infer.entrypoints.plan_cli import run_profile

    return run_profile(args)


def _plan(args) -> int:
    from dist_infer.entrypoints.plan_cli import run_plan

    return run_plan(args)


if __name__ == "__main__":
    sys.exit(main())
