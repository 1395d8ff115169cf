"""The `foresight-lab` command line (also `python -m foresight_lab`), after vLLM's shape.

foresight-lab serve [MODEL] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--served-model-name NAME]
foresight-lab generate [MODEL] PROMPT [--max-tokens N] [--temperature T] [--seed S]
foresight-lab pull MODEL
"""

from __future__ import annotations

import argparse
import os
import sys

from foresight_lab.engine.kv_cache import KV_CACHE_DTYPES, EngineConfig
from foresight_lab.engine.request import FORESIGHT_DEFAULT_TEMPERATURE, InvalidRequestError
from foresight_lab.models.quantized import ACTIVATION_BITS
from foresight_lab.weights import registry


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="foresight-lab",
        description="Run language models in a JAX/Flax engine.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="print a completion of PROMPT")
    generate.add_argument(
        "words",
        nargs="+",
        metavar="[MODEL] PROMPT",
        help=f"model (default {registry.DEFAULT_MODEL}: a built-in alias, .gguf file or "
        "Hugging Face directory) and the prompt",
    )
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=FORESIGHT_DEFAULT_TEMPERATURE)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--chat", action="store_true", help="send PROMPT as a user message")

    serve = commands.add_parser("serve", help="serve MODEL at the Foresight (OpenAI) API")
    serve.add_argument("model", nargs="?", default=registry.DEFAULT_MODEL, metavar="MODEL")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve.add_argument(
        "--api-key",
        default=os.environ.get("FORESIGHT_LAB_API_KEY"),
        help="(or FORESIGHT_LAB_API_KEY)",
    )
    serve.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="the model id clients send (default: the alias, or the file or directory name); "
        "several are all accepted, the first named in responses",
    )
    serve.add_argument("--max-slots", type=int, default=8)
    serve.add_argument("--max-cache-length", type=int, default=2048)
    serve.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default=EngineConfig.kv_cache_dtype,
        help="element type of the KV cache (float16 halves its memory; float32 keeps "
        "keys and values exactly as computed)",
    )
    serve.add_argument(
        "--activation-bits",
        type=int,
        choices=ACTIVATION_BITS,
        default=EngineConfig.activation_bits,
        help="bits the CPU kernel rounds each block of 32 inputs of a Q4_1 matmul to (8, "
        "as llama.cpp does, is about a fifth faster and less exact; 16 keeps greedy "
        "output equal to the float32 path's on the tests' prompts)",
    )
    serve.add_argument(
        "--warmup",
        action="store_true",
        help="compile every shape before serving, so no request waits for a compilation",
    )

    pull = commands.add_parser("pull", help="fetch a built-in model into the local cache")
    pull.add_argument("model", choices=sorted(registry.BUILTIN_MODELS))
    pull.add_argument("--force", action="store_true", help="fetch again even if cached")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "pull":
            path = registry.pull(args.model, force=args.force)
            print(path)
        elif args.command == "generate":
            return _generate(args)
        elif args.command == "serve":
            return _serve(args)
    except (InvalidRequestError, registry.ModelNotFoundError, ValueError) as error:
        print(f"foresight-lab: error: {error}", file=sys.stderr)
        return 2
    return 0


def _generate(args) -> int:
    import foresight_lab as fl

    if len(args.words) > 2:
        raise ValueError("generate takes [MODEL] PROMPT: quote a prompt that has spaces")
    model, prompt = (registry.DEFAULT_MODEL, *args.words) if len(args.words) == 1 else args.words
    lab = fl.load(model)
    sampling = dict(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    if args.chat:
        pieces = lab.chat([{"role": "user", "content": prompt}], stream=True, **sampling)
    else:
        pieces = lab.generate(prompt, stream=True, **sampling)
        print(prompt, end="", flush=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    lab.engine.shutdown()
    return 0


def _serve(args) -> int:
    """Serves in the foreground until Ctrl-C (SIGINT) or SIGTERM, then stops cleanly."""
    import signal
    import threading

    import foresight_lab as fl
    from foresight_lab.engine.heap import unmap_large_buffers_when_freed
    from foresight_lab.server import serve

    unmap_large_buffers_when_freed()
    lab = fl.load(
        args.model,
        max_slots=args.max_slots,
        max_cache_length=args.max_cache_length,
        kv_cache_dtype=args.kv_cache_dtype,
        activation_bits=args.activation_bits,
    )
    if args.warmup:
        # This process only serves: nothing will be traced again after the warm-up.
        lab.warmup(clear_jax_caches=True)
    try:
        server = serve(
            lab.engine,
            args.host,
            args.port,
            api_key=args.api_key,
            served_model_name=args.served_model_name,
            forecaster=lab.forecaster,
            log_level="info",
        )
    except OSError as error:
        lab.engine.shutdown()
        print(
            f"foresight-lab: error: cannot listen on {args.host}:{args.port}: {error}",
            file=sys.stderr,
        )
        return 1
    name = args.served_model_name[0] if args.served_model_name else lab.name
    print(f"Serving {name} at {server.base_url} (Ctrl-C stops)", flush=True)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    while server.running and not stopping.wait(0.2):
        pass
    print("Stopping: letting open requests finish", flush=True)
    server.stop()
    lab.engine.shutdown()
    return 0 if stopping.is_set() else 1
