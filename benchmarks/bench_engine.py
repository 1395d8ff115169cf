"""This engine against transformers on PyTorch fp32, on the same SmolLM2 GGUF, in one run.

    python benchmarks/bench_engine.py [--prompt-tokens 512] [--decode-tokens 128]

Prints a table: time to first token for a long prompt, single-stream greedy decode
tokens/s, the process's peak resident memory after each system, and this engine's
compilations after warm-up. Needs the dev extra (torch, accelerate).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

TEXT = (
    "Forecasting is the practice of assigning probabilities to future events. A good "
    "forecaster is calibrated: of all the events given a 70% chance, about seven in ten "
    "happen. Researchers score forecasts with the Brier score and the log score. "
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_ids(tokenizer, length: int) -> list[int]:
    ids = tokenizer.encode(TEXT * (length // 40 + 1))
    return ids[:length]


def bench_foresight(path, prompt: list[int], decode_tokens: int, repeats: int) -> dict:
    import foresight_lab as fl

    lab = fl.load(str(path), max_slots=8, max_cache_length=1024, progress=False)
    started = time.perf_counter()
    lab.warmup(progress=False)
    warmup_s = time.perf_counter() - started
    compiles_after_warmup = lab.engine.compile_count
    ttfts, rates = [], []
    for _ in range(repeats):
        options = fl.SamplingOptions(max_tokens=decode_tokens, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        stamps = []
        for _delta in lab.engine.submit(prompt, options):
            stamps.append(time.perf_counter())
        ttfts.append(stamps[0] - start)
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    lab.engine.shutdown()
    return {
        "system": "foresight-lab (JAX, weights in their Q4_1 and Q8_0 blocks)",
        "ttft_s": min(ttfts),
        "decode_tps": max(rates),
        "peak_rss_mb": peak_rss_mb(),
        "compiles_after_warmup": lab.engine.compile_count - compiles_after_warmup,
        "warmup_s": warmup_s,
    }


def bench_torch(path, prompt: list[int], decode_tokens: int, repeats: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    ttfts, rates = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            ids = torch.tensor([prompt])
            start = time.perf_counter()
            out = model(ids, use_cache=True)
            token = out.logits[0, -1].argmax().reshape(1, 1)
            first = time.perf_counter()
            cache = out.past_key_values
            for _ in range(decode_tokens - 1):
                out = model(token, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                token = out.logits[0, -1].argmax().reshape(1, 1)
            end = time.perf_counter()
            ttfts.append(first - start)
            rates.append((decode_tokens - 1) / (end - first))
    return {
        "system": f"transformers {transformers.__version__} (PyTorch {torch.__version__}, fp32)",
        "ttft_s": min(ttfts),
        "decode_tps": max(rates),
        "peak_rss_mb": peak_rss_mb(),
        "compiles_after_warmup": None,
        "warmup_s": None,
    }


def table(rows: list[dict], prompt_tokens: int, decode_tokens: int) -> str:
    header = (
        f"| system | TTFT, {prompt_tokens}-token prompt | decode tok/s (1 stream, "
        f"{decode_tokens} tokens) | peak RSS after (MB) | compiles after warm-up |"
    )
    lines = [header, "|---|---|---|---|---|"]
    for r in rows:
        compiles = "n/a" if r["compiles_after_warmup"] is None else r["compiles_after_warmup"]
        lines.append(
            f"| {r['system']} | {r['ttft_s'] * 1000:.0f} ms | {r['decode_tps']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {compiles} |"
        )
    return "\n".join(lines)


def machine() -> str:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} on {jax.default_backend()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from foresight_lab.tokenizer import load_tokenizer
    from foresight_lab.weights import registry

    path = registry.resolve(args.model)
    prompt = prompt_ids(load_tokenizer(path), args.prompt_tokens)
    assert len(prompt) == args.prompt_tokens, "the benchmark text is too short"
    # This engine first: the peak RSS column is cumulative for the process.
    rows = [
        bench_foresight(path, prompt, args.decode_tokens, args.repeats),
        bench_torch(path, prompt, args.decode_tokens, args.repeats),
    ]
    speedup = rows[0]["decode_tps"] / rows[1]["decode_tps"]
    print(f"\nMachine: {machine()}; model {args.model} ({path.name})\n")
    print(table(rows, args.prompt_tokens, args.decode_tokens))
    print(f"\nSingle-stream decode: {speedup:.2f}x transformers fp32.")
    print(f"Warm-up (compiling every shape bucket): {rows[0]['warmup_s']:.0f} s.")


if __name__ == "__main__":
    main()
