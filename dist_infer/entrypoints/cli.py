"""The ``dist-infer`` command.

    dist-infer generate "What is the capital of France?"      answer from the embedded default model
    dist-infer generate --stream --temperature 0.7 PROMPT...   sampled, printed as tokens arrive
    dist-infer convert SRC.gguf DEST/                          a GGUF file as a Hugging Face folder

Errors print one line and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from dist_infer.engine.arg_utils import EngineArgs

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
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                     help="wrap each prompt in the model's chat template (default: when it has one)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    EngineArgs.add_cli_args(gen)
    gen.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("DIST_INFER_API_KEY"),
                       help="require this Bearer token on /v1/* (default: $DIST_INFER_API_KEY)")
    serve.add_argument("--served-model-name", default=None, help="the model id clients use (default: from the path)")
    serve.add_argument("--max-waiting", type=int, default=None,
                       help="answer 429 once this many requests wait to start (default: unbounded)")
    serve.add_argument("--max-request-bytes", type=int, default=1 << 20)
    serve.add_argument("--ready-timeout", type=float, default=30.0)
    serve.add_argument("--log-level", default="warning")
    EngineArgs.add_cli_args(serve)
    serve.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

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
        if args.command == "generate":
            return _generate(args)
        if args.command == "convert":
            return _convert(args)
        if args.command == "serve":
            return _serve(args)
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
    from dist_infer.engine.arg_utils import EngineArgs
    from dist_infer.executor.torchrun import worker_loop

    try:
        worker_loop(EngineArgs.from_cli_args(args).create_engine_config())
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
    from dist_infer.engine.arg_utils import EngineArgs
    from dist_infer.entrypoints.llm import LLM, apply_chat_template
    from dist_infer.sampling_params import SamplingParams

    engine_args = EngineArgs.from_cli_args(args)
    # Validate sampling flags before the (slower) model load.
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens, stop=args.stop,
                            seed=args.seed)
    with LLM(**vars(engine_args)) as llm:
        tokenizer = llm.get_tokenizer()
        use_chat = args.chat if args.chat is not None else bool(getattr(tokenizer, "chat_template", None))
        prompts = []
        for text in args.prompts:
            if use_chat:
                templated = apply_chat_template(tokenizer, [{"role": "user", "content": text}])
                prompts.append({"prompt": templated,
                                "prompt_token_ids": tokenizer.encode(templated, add_special_tokens=False)})
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


def _serve(args) -> int:
    from dist_infer.engine.arg_utils import EngineArgs
    from dist_infer.entrypoints.openai.api_server import ServerSettings, run_server
    from dist_infer.model_loader.resolve import DEFAULT_MODEL_NAME

    engine_args = EngineArgs.from_cli_args(args)
    name = args.served_model_name or (os.path.basename(os.path.normpath(args.model)) if args.model
                                      else DEFAULT_MODEL_NAME)
    settings = ServerSettings(name, args.api_key, args.max_waiting, args.max_request_bytes, args.ready_timeout)
    run_server(engine_args, settings, args.host, args.port, args.log_level)
    return 0


def _convert(args) -> int:
    from dist_infer.model_loader.gguf_convert import convert_gguf

    dest = convert_gguf(args.src, args.dest, overwrite=args.overwrite)
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
