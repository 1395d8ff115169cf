"""This project's server against llama.cpp's and transformers (PyTorch fp32), in one run.

    python benchmarks/bench_serving.py [--systems foresight,llama.cpp,transformers]
        [--prompt-tokens 512] [--decode-tokens 128] [--stream-tokens 64]
        [--concurrency 1,4,8,16] [--repeats 3]

One GGUF file (SmolLM2-135M-Instruct Q4_1 by default), one set of prompts, three systems,
each in a fresh process of its own:

- foresight-lab: `python -m foresight_lab serve --warmup`, measured over HTTP (streaming
  `/openai/completions`, greedy, `ignore_eos`);
- llama.cpp: `python -m llama_cpp.server` from llama-cpp-python (the `bench` extra),
  measured over HTTP the same way (`/v1/completions`; it has no `ignore_eos`, so tokens
  are counted as they arrive);
- transformers on PyTorch fp32: in process, as in `bench_engine.py` (its single-stream
  function is reused); N streams are one batch of N equal-length prompts.

Figures: time to first token for a long prompt; single-stream decode tokens/s; aggregate
tokens/s (all tokens over the wall time of the burst, prefill and queueing included)
with N streams started at once; peak resident memory of the serving process (VmHWM);
compilations after warm-up (foresight-lab only, from `GET /metrics`). Every prompt is
distinct from its first tokens on, so no server can answer from a cached prefix.

Writes `benchmarks/results/serving.{md,json,png}` (table, raw figures, throughput
against concurrency). foresight-lab starts with `serve --warmup` (every shape compiled
before it listens) where the CLI has that flag; every server then gets one unmeasured
round of every request shape before the measured rounds.

On a shared machine, each system waits (`--wait-for-quiet` seconds at most) for the
CPU to be nearly idle, and the table says how much CPU other processes took meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import pathlib
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # bench_engine sits beside this file

from bench_engine import TEXT, bench_torch  # noqa: E402

SYSTEMS = ("foresight", "llama.cpp", "transformers")
STARTUP_TIMEOUT_S = 900  # loading and dequantizing on a busy 2-core machine


# ---- prompts ---------------------------------------------------------------------------


@dataclasses.dataclass
class Prompts:
    """Distinct prompts of exact token lengths, as text (for HTTP) and ids (for torch).

    Each one starts with its own number, so a server that reuses the KV cache of a
    shared prefix (llama.cpp does) finds at most four tokens in common with the last one.
    """

    tokenizer: object
    served: int = 0

    def next(self, length: int) -> tuple[str, list[int]]:
        self.served += 1
        return exact_length_text(self.tokenizer, f"Note {self.served}. {TEXT}", length)

    def batch(self, count: int, length: int) -> list[tuple[str, list[int]]]:
        return [self.next(length) for _ in range(count)]


def exact_length_text(tokenizer, seed_text: str, length: int) -> tuple[str, list[int]]:
    """A prefix of seed_text (repeated) whose tokenization is exactly `length` ids."""
    ids = tokenizer.encode(seed_text + TEXT * (length // 40 + 1), add_special_tokens=False)
    # Cutting the ids and decoding can re-merge at the cut, so search the cut point.
    for cut in range(length, length + 8):
        text = tokenizer.decode(ids[:cut])
        again = tokenizer.encode(text, add_special_tokens=False)
        if len(again) == length:
            return text, again
    raise ValueError(f"no text of exactly {length} tokens found")


# ---- streaming over HTTP ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StreamTiming:
    """One streamed completion, in seconds since its burst started."""

    sent_s: float
    first_token_s: float
    last_token_s: float
    tokens: int
    prompt_tokens: int | None

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.sent_s

    @property
    def decode_tps(self) -> float:
        """Tokens after the first, over the time between the first and the last."""
        return (self.tokens - 1) / max(self.last_token_s - self.first_token_s, 1e-9)


@dataclasses.dataclass(frozen=True)
class Burst:
    """N streams started at once."""

    streams: list[StreamTiming]
    wall_s: float

    @property
    def aggregate_tps(self) -> float:
        return sum(s.tokens for s in self.streams) / self.wall_s

    @property
    def most_decoding_at_once(self) -> int:
        """The largest number of streams between their first and last token at one time:
        N when the server interleaves N streams, 1 when it serves them one by one."""
        events = sorted(
            [(s.first_token_s, 1) for s in self.streams]
            + [(s.last_token_s, -1) for s in self.streams]
        )
        live = most = 0
        for _, step in events:
            live += step
            most = max(most, live)
        return most


async def stream_completion(
    client: httpx.AsyncClient, url: str, body: dict, burst_start: float
) -> StreamTiming:
    sent = time.perf_counter() - burst_start
    first = last = None
    chunks, usage = 0, None
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {await response.aread()!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"{url}: error in stream: {event['error']}")
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or []:
                if choice.get("text"):
                    now = time.perf_counter() - burst_start
                    first = now if first is None else first
                    last = now
                    chunks += 1
    if first is None:
        raise RuntimeError(f"{url}: the stream carried no text")
    # A chunk is one token on both servers, except where a token ends inside a UTF-8
    # character; the server's own count wins where it gives one.
    tokens = usage["completion_tokens"] if usage else chunks
    prompt_tokens = usage["prompt_tokens"] if usage else None
    return StreamTiming(sent, first, last, tokens, prompt_tokens)


async def burst(url: str, bodies: list[dict]) -> Burst:
    limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        start = time.perf_counter()
        streams = await asyncio.gather(
            *(stream_completion(client, url, body, start) for body in bodies)
        )
        return Burst(list(streams), time.perf_counter() - start)


# ---- server processes ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    """The process's high-water mark of resident memory (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


@dataclasses.dataclass
class ServerProcess:
    """A server started as a subprocess, its log in a file, stopped with SIGTERM."""

    name: str
    command: list[str]
    base_url: str  # what an OpenAI client takes
    log_path: pathlib.Path
    process: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        log = open(self.log_path, "w")  # noqa: SIM115 (the child writes to it until stop)
        self.process = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=_server_env()
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start; see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/models", timeout=5).status_code == 200:
                    return self
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"{self.name} did not start in {STARTUP_TIMEOUT_S} s")

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.process.pid)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _server_env() -> dict:
    env = dict(os.environ)
    # This checkout's package, whatever is installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def compile_count(server_url: str) -> int:
    text = httpx.get(f"{server_url}/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith("foresight_compilations_total"):
            return int(float(line.split()[-1]))
    raise RuntimeError("GET /metrics has no foresight_compilations_total")


# ---- the workload ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
    prompt_tokens: int  # the long prompt (time to first token)
    decode_tokens: int  # the single stream
    stream_prompt_tokens: int  # each of the N concurrent streams
    stream_tokens: int
    concurrency: tuple[int, ...]
    repeats: int


def measure_http(
    url: str, model: str, extra: dict, prompts: Prompts, work: Workload, between=None
) -> dict:
    """Warm-up round, then `repeats` rounds; best of each figure. `between()` runs once,
    after the warm-up (to read a counter)."""

    def body(text: str, max_tokens: int) -> dict:
        return {
            "model": model,
            "prompt": text,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            **extra,
        }

    def single() -> StreamTiming:
        text, _ = prompts.next(work.prompt_tokens)
        return asyncio.run(burst(url, [body(text, work.decode_tokens)])).streams[0]

    def concurrent(n: int) -> Burst:
        batch = prompts.batch(n, work.stream_prompt_tokens)
        return asyncio.run(burst(url, [body(text, work.stream_tokens) for text, _ in batch]))

    # Warm-up: every shape once (compiles on foresight-lab, page-ins everywhere).
    single()
    for n in work.concurrency:
        concurrent(n)
    after_warmup = between() if between else None

    singles = [single() for _ in range(work.repeats)]
    bursts = {n: [concurrent(n) for _ in range(work.repeats)] for n in work.concurrency}
    best = {n: max(runs, key=lambda b: b.aggregate_tps) for n, runs in bursts.items()}
    return {
        "ttft_s": min(s.ttft_s for s in singles),
        "decode_tps": max(s.decode_tps for s in singles),
        "decode_tokens_seen": min(s.tokens for s in singles),
        "prompt_tokens_seen": singles[0].prompt_tokens,
        "aggregate_tps": {n: b.aggregate_tps for n, b in best.items()},
        "aggregate_tokens_seen": {n: sum(s.tokens for s in b.streams) for n, b in best.items()},
        "median_ttft_s": {n: _median([s.ttft_s for s in b.streams]) for n, b in best.items()},
        "most_decoding_at_once": {n: b.most_decoding_at_once for n, b in best.items()},
        "after_warmup": after_warmup,
    }


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def bench_foresight(args, path, prompts: Prompts, work: Workload, logs: pathlib.Path) -> dict:
    port = free_port()
    warmup = cli_has_warmup()
    server = ServerProcess(
        "foresight-lab",
        [sys.executable, "-m", "foresight_lab", "serve", args.model]
        + f"--port {port} --max-slots {args.max_slots}".split()
        + f"--max-cache-length {args.max_cache_length}".split()
        + f"--kv-cache-dtype {args.kv_cache_dtype}".split()
        + f"--activation-bits {args.activation_bits}".split()
        + (["--warmup"] if warmup else []),
        f"http://127.0.0.1:{port}/openai",
        logs / "foresight-lab.log",
    )
    started = time.perf_counter()
    server.start()
    startup_s = time.perf_counter() - started
    try:
        root = f"http://127.0.0.1:{port}"
        at_ready = compile_count(root)
        result = measure_http(
            f"{server.base_url}/completions",
            registry_name(args.model),
            {"ignore_eos": True, "stream_options": {"include_usage": True}},
            prompts,
            work,
            between=lambda: compile_count(root),
        )
        after_http_warmup = result.pop("after_warmup")
        # With the CLI's --warmup, its warm-up is the one that counts: every compilation
        # after the server is ready, the HTTP warm-up round included, is a miss.
        result["compiles_after_warmup"] = compile_count(root) - (
            at_ready if warmup else after_http_warmup
        )
        result["compiles_at_ready"] = at_ready
        result["peak_rss_mb"] = server.peak_rss_mb()
    finally:
        server.stop()
    result["startup_s"] = startup_s
    result["wall_s"] = time.perf_counter() - started
    result["how"] = (
        f"HTTP, {args.max_slots} slots x {args.max_cache_length} tokens, "
        f"{args.kv_cache_dtype} KV cache, {args.activation_bits}-bit activations, "
    ) + ("`serve --warmup`" if warmup else "warmed by one round of requests")
    result["system"] = "foresight-lab"
    return result


def cli_has_warmup() -> bool:
    """Whether `foresight-lab serve` takes --warmup (compile every shape before serving)."""
    help_text = subprocess.run(
        [sys.executable, "-m", "foresight_lab", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_server_env(),
    ).stdout
    return "--warmup" in help_text


def bench_llama_cpp(args, path, prompts: Prompts, work: Workload, logs: pathlib.Path) -> dict:
    import llama_cpp

    port = free_port()
    server = ServerProcess(
        "llama.cpp",
        [sys.executable, "-m", "llama_cpp.server", "--model", str(path)]
        + f"--host 127.0.0.1 --port {port} --n_ctx {args.max_cache_length}".split()
        + f"--n_threads {args.threads} --n_threads_batch {args.threads}".split()
        # By default a queued request cuts the running stream short; let each finish.
        # And by default prefill computes logits at every prompt position (for echoed
        # prompt logprobs, which this benchmark never asks for); skip that work.
        + ["--interrupt_requests", "False", "--logits_all", "False"],
        f"http://127.0.0.1:{port}/v1",
        logs / "llama-cpp.log",
    )
    started = time.perf_counter()
    server.start()
    startup_s = time.perf_counter() - started
    try:
        result = measure_http(f"{server.base_url}/completions", str(path), {}, prompts, work)
        result.pop("after_warmup")
        result["peak_rss_mb"] = server.peak_rss_mb()
    finally:
        server.stop()
    result["wall_s"] = time.perf_counter() - started
    result["startup_s"] = startup_s
    result["compiles_after_warmup"] = None
    result["how"] = f"HTTP, n_ctx {args.max_cache_length}, {args.threads} threads"
    result["system"] = f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"
    return result


def bench_transformers(args, path, prompts: Prompts, work: Workload, logs: pathlib.Path) -> dict:
    """Two fresh processes (single stream, then batches), so each peak RSS is its own."""
    _, long_ids = prompts.next(work.prompt_tokens)
    batches = {
        n: [ids for _, ids in prompts.batch(n, work.stream_prompt_tokens)] for n in work.concurrency
    }
    started = time.perf_counter()
    single = _torch_worker(
        "single",
        {
            "path": str(path),
            "prompt": long_ids,
            "decode_tokens": work.decode_tokens,
            "repeats": work.repeats,
        },
        logs,
    )
    batched = _torch_worker(
        "batch",
        {
            "path": str(path),
            "batches": {str(n): b for n, b in batches.items()},
            "tokens": work.stream_tokens,
            "repeats": work.repeats,
        },
        logs,
    )
    return {
        "system": single["system"],
        "ttft_s": single["ttft_s"],
        "decode_tps": single["decode_tps"],
        "decode_tokens_seen": work.decode_tokens,
        "prompt_tokens_seen": len(long_ids),
        "aggregate_tps": {int(n): v for n, v in batched["aggregate_tps"].items()},
        "aggregate_tokens_seen": {n: n * work.stream_tokens for n in work.concurrency},
        "median_ttft_s": {int(n): v for n, v in batched["ttft_s"].items()},
        "most_decoding_at_once": {n: n for n in work.concurrency},
        "peak_rss_mb": max(single["peak_rss_mb"], batched["peak_rss_mb"]),
        "compiles_after_warmup": None,
        "wall_s": time.perf_counter() - started,
        "how": "in process, batch of N",
    }


def _torch_worker(mode: str, job: dict, logs: pathlib.Path) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        job_path, out_path = pathlib.Path(scratch, "job.json"), pathlib.Path(scratch, "out.json")
        job_path.write_text(json.dumps(job))
        with open(logs / f"transformers-{mode}.log", "w") as log:
            subprocess.run(
                [sys.executable, __file__, "--torch-worker", mode, str(job_path), str(out_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                check=True,
                cwd=ROOT,
                env=_server_env(),
            )
        return json.loads(out_path.read_text())


def torch_worker(mode: str, job_path: str, out_path: str) -> None:
    job = json.loads(pathlib.Path(job_path).read_text())
    path = pathlib.Path(job["path"])
    if mode == "single":
        result = bench_torch(path, job["prompt"], job["decode_tokens"], job["repeats"])
    else:
        result = torch_batches(path, job["batches"], job["tokens"], job["repeats"])
    result["peak_rss_mb"] = peak_rss_mb(os.getpid())
    pathlib.Path(out_path).write_text(json.dumps(result))


def torch_batches(path: pathlib.Path, batches: dict, tokens: int, repeats: int) -> dict:
    """Greedy decode of each batch of equal-length prompts (no padding needed): aggregate
    tokens/s over prefill and decode, best of `repeats`, and the prefill time."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    rates, ttfts = {}, {}
    with torch.inference_mode():
        for n, prompts in batches.items():
            ids = torch.tensor(prompts)  # Int['N L']
            best_rate, best_ttft = 0.0, float("inf")
            for _ in range(repeats + 1):  # the first round warms up
                start = time.perf_counter()
                out = model(ids, use_cache=True)
                next_ids = out.logits[:, -1].argmax(-1, keepdim=True)  # Int['N 1']
                first = time.perf_counter()
                cache = out.past_key_values
                for _ in range(tokens - 1):
                    out = model(next_ids, past_key_values=cache, use_cache=True)
                    cache = out.past_key_values
                    next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
                wall = time.perf_counter() - start
                best_rate = max(best_rate, len(prompts) * tokens / wall)
                best_ttft = min(best_ttft, first - start)
                del out, cache
                gc.collect()
            rates[n], ttfts[n] = best_rate, best_ttft
    return {"aggregate_tps": rates, "ttft_s": ttfts}


def registry_name(model: str) -> str:
    from foresight_lab.weights import registry

    return registry.served_name(model)


# ---- the rest of the machine -----------------------------------------------------------


def machine_busy_s() -> float:
    """CPU seconds all processes have spent busy since boot (from /proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and its children that have been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@contextlib.contextmanager
def others_cpu():
    """Yields a dict whose "cores" is, once the block ends, the CPU other processes took
    while it ran (in cores: 1.0 is one core busy the whole time). The block must wait for
    the processes it starts, so their time counts as its own."""
    busy, own, start = machine_busy_s(), own_cpu_s(), time.perf_counter()
    share: dict = {}
    yield share
    others = (machine_busy_s() - busy) - (own_cpu_s() - own)
    share["cores"] = max(0.0, others) / (time.perf_counter() - start)


def wait_for_quiet(limit_s: float, cores: float = 0.3, window_s: float = 5) -> float:
    """Waits until the machine is nearly idle (under `cores` busy over `window_s`), at most
    `limit_s`; returns the busy cores last seen. On a shared machine another process's
    threads take cores from the system under test, and llama.cpp's spinning threads
    collapse when one of its two cores is taken."""
    deadline, told = time.monotonic() + limit_s, False
    while True:
        with others_cpu() as share:
            time.sleep(window_s)
        if share["cores"] < cores or time.monotonic() > deadline:
            return share["cores"]
        if not told:
            print(f"  waiting for the machine to be quiet ({share['cores']:.1f} cores busy)")
            told = True


# ---- reporting -------------------------------------------------------------------------


def table(rows: list[dict], work: Workload) -> str:
    def cell(value, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    lines = [
        "| | " + " | ".join(r["system"] for r in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    row(
        f"TTFT, {work.prompt_tokens}-token prompt (ms)",
        [cell(r["ttft_s"] * 1000, ".0f") for r in rows],
    )
    row(
        f"decode tok/s, 1 stream ({work.decode_tokens} tokens)",
        [cell(r["decode_tps"], ".1f") for r in rows],
    )
    for n in work.concurrency:
        row(
            f"aggregate tok/s, {n} stream{'s' if n > 1 else ''} ({work.stream_tokens} tokens each)",
            [cell(r["aggregate_tps"].get(n), ".1f") for r in rows],
        )
    top = max(work.concurrency)
    row(
        f"median TTFT with {top} streams (ms)",
        [cell(r["median_ttft_s"].get(top, 0) * 1000, ".0f") for r in rows],
    )
    row(
        f"most streams decoding at once (of {top})",
        [str(r["most_decoding_at_once"].get(top, "n/a")) for r in rows],
    )
    row("peak RSS (MB)", [cell(r["peak_rss_mb"], ".0f") for r in rows])
    row("start to ready (s)", [cell(r.get("startup_s"), ".0f") for r in rows])
    row("compiles after warm-up", [cell(r["compiles_after_warmup"], "d") for r in rows])
    row(
        "other processes' CPU meanwhile (cores)",
        [cell(r.get("others_cores"), ".2f") for r in rows],
    )
    row("how it ran", [r["how"] for r in rows])
    return "\n".join(lines)


def counted(rows: list[dict], work: Workload) -> list[str]:
    """What each system actually generated: llama.cpp has no ignore_eos, so a stream
    may end early, and the rates are over the tokens that came."""
    out = []
    for r in rows:
        prompt = r["prompt_tokens_seen"]
        streams = ", ".join(f"{n}: {t}" for n, t in r["aggregate_tokens_seen"].items())
        out.append(
            f"- {r['system']}: single stream {r['decode_tokens_seen']} of "
            f"{work.decode_tokens} tokens (prompt: {prompt or 'not reported'} tokens); "
            f"tokens per burst {streams} (of {work.stream_tokens} per stream)"
        )
    return out


def targets(rows: dict[str, dict], work: Workload, rss_budget_mb: float) -> list[str]:
    """DESIGN.md section 7's targets, met or not, where the figures exist."""
    ours, llama, torch = (rows.get(k) for k in ("foresight", "llama.cpp", "transformers"))
    if ours is None:
        return []
    out = []

    def check(name: str, met: bool, detail: str) -> None:
        out.append(f"- {'met' if met else 'NOT met'}: {name} ({detail})")

    if llama and 8 in work.concurrency:
        ratio = ours["aggregate_tps"][8] / llama["aggregate_tps"][8]
        check("8-stream aggregate >= 3x llama.cpp", ratio >= 3, f"{ratio:.2f}x")
    if llama:
        ratio = ours["decode_tps"] / llama["decode_tps"]
        check("single-stream decode >= llama.cpp", ratio >= 1, f"{ratio:.2f}x")
        ratio = ours["ttft_s"] / llama["ttft_s"]
        check(
            "TTFT no worse than llama.cpp",
            ratio <= 1,
            f"{ours['ttft_s'] * 1000:.0f} ms vs {llama['ttft_s'] * 1000:.0f} ms",
        )
    if torch:
        ratio = ours["decode_tps"] / torch["decode_tps"]
        check("single-stream decode >= 6x PyTorch fp32", ratio >= 6, f"{ratio:.2f}x")
    check(
        "peak RSS <= 2x GGUF + KV cache budget",
        ours["peak_rss_mb"] <= rss_budget_mb,
        f"{ours['peak_rss_mb']:.0f} MB vs {rss_budget_mb:.0f} MB",
    )
    check(
        "zero compiles after warm-up",
        ours["compiles_after_warmup"] == 0,
        str(ours["compiles_after_warmup"]),
    )
    return out


def plot(rows: list[dict], work: Workload, png: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        levels = sorted(r["aggregate_tps"])
        axes.plot(levels, [r["aggregate_tps"][n] for n in levels], marker="o", label=r["system"])
    axes.set_xscale("log", base=2)
    axes.set_xticks(list(work.concurrency), [str(n) for n in work.concurrency])
    axes.set_xlabel("concurrent streams")
    axes.set_ylabel(f"aggregate tokens/s ({work.stream_tokens} tokens per stream)")
    axes.set_title(title, fontsize=9)
    axes.set_ylim(bottom=0)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    plt.close(figure)


# Vector extensions that decide how fast each system's kernels can be, as /proc/cpuinfo
# names them.
CPU_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def machine() -> str:
    """The CPU (its name, family and model, the vector extensions that matter here), the
    cores and the memory: figures from different CPUs are not comparable."""
    cpu = platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        fields = {}
        for line in f:
            if not line.strip():
                break  # the first processor's fields are enough
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        flags = set(fields.get("flags", "").split())
        features = " ".join(name for name in CPU_FEATURES if name in flags) or "no AVX2"
        cpu = (
            f"{fields.get('model name', cpu)} (family {fields.get('cpu family', '?')}, "
            f"model {fields.get('model', '?')}; {features})"
        )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB"


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("jax", "llama-cpp-python", "torch", "transformers"):
        with contextlib.suppress(PackageNotFoundError):
            found.append(f"{package} {version(package)}")
    return ", ".join(found)


def git_state() -> str:
    def git(*words: str) -> str:
        return subprocess.run(["git", *words], cwd=ROOT, capture_output=True, text=True).stdout

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = git("status", "--porcelain", "--", "foresight_lab").strip()
    return f"{head}{' (with uncommitted changes to foresight_lab/)' if dirty else ''}"


def rss_budget_mb(args, path: pathlib.Path) -> float:
    """2x the GGUF file plus the KV cache the foresight-lab server preallocates."""
    from foresight_lab.engine.kv_cache import EngineConfig
    from foresight_lab.models.config import ModelConfig
    from foresight_lab.weights.gguf import read_header

    metadata, tensors, _ = read_header(path)
    config = ModelConfig.from_gguf(metadata, has_output_weight="output.weight" in tensors)
    engine = EngineConfig(
        max_slots=args.max_slots,
        max_cache_length=args.max_cache_length,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    kv = engine.cache_bytes(config)
    return (2 * path.stat().st_size + kv) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias or .gguf path")
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {','.join(SYSTEMS)}",
    )
    parser.add_argument("--prompt-tokens", type=int, default=512, help="the TTFT prompt")
    parser.add_argument("--decode-tokens", type=int, default=128, help="the single stream")
    parser.add_argument(
        "--stream-prompt-tokens", type=int, default=64, help="prompt of each concurrent stream"
    )
    parser.add_argument(
        "--stream-tokens", type=int, default=64, help="tokens each concurrent stream generates"
    )
    parser.add_argument("--concurrency", default="1,4,8,16", help="comma-separated levels")
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds; best is kept")
    parser.add_argument("--max-slots", type=int, default=16, help="foresight-lab --max-slots")
    parser.add_argument(
        "--max-cache-length",
        type=int,
        default=1024,
        help="foresight-lab --max-cache-length, llama.cpp --n_ctx",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        choices=("float16", "float32"),
        default="float16",
        help="foresight-lab --kv-cache-dtype (llama.cpp's cache is float16)",
    )
    parser.add_argument(
        "--activation-bits",
        type=int,
        choices=(16, 8),
        default=16,
        help="foresight-lab --activation-bits (llama.cpp rounds a Q4_1 matmul's inputs to 8 bits)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="llama.cpp threads (PyTorch and XLA use every core)",
    )
    parser.add_argument(
        "--wait-for-quiet",
        type=float,
        default=600,
        help="seconds to wait, before each system, for other processes to leave the CPU",
    )
    parser.add_argument("--results", default=str(HERE / "results"), help="output folder")
    parser.add_argument("--torch-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_worker:
        torch_worker(*args.torch_worker)
        return

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"--systems: unknown {sorted(unknown)}; pick from {list(SYSTEMS)}")
    work = Workload(
        prompt_tokens=args.prompt_tokens,
        decode_tokens=args.decode_tokens,
        stream_prompt_tokens=args.stream_prompt_tokens,
        stream_tokens=args.stream_tokens,
        concurrency=tuple(int(n) for n in args.concurrency.split(",")),
        repeats=args.repeats,
    )

    from foresight_lab.tokenizer import load_tokenizer
    from foresight_lab.weights import registry

    path = registry.resolve(args.model)
    prompts = Prompts(load_tokenizer(path))
    results = pathlib.Path(args.results)
    logs = results / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = datetime.datetime.now().astimezone()
    print(
        f"Load average before the run: {load_before[0]:.2f} {load_before[1]:.2f} "
        f"{load_before[2]:.2f}; server logs in {logs}",
        flush=True,
    )

    benches = {
        "foresight": bench_foresight,
        "llama.cpp": bench_llama_cpp,
        "transformers": bench_transformers,
    }
    rows: dict[str, dict] = {}
    loads: dict[str, tuple[float, float, float]] = {}
    for name in systems:
        print(f"Measuring {name} ...", flush=True)
        quiet = wait_for_quiet(args.wait_for_quiet)
        with others_cpu() as share:
            rows[name] = benches[name](args, path, prompts, work, logs)
        rows[name].update(others_cores=share["cores"], others_cores_before=quiet)
        loads[name] = os.getloadavg()
        print(
            f"  done in {rows[name]['wall_s']:.0f} s; other processes took "
            f"{share['cores']:.2f} cores meanwhile ({quiet:.2f} just before)",
            flush=True,
        )
        partial = results / "serving.partial.json"  # kept if a later system fails
        partial.write_text(json.dumps(rows, indent=2, default=str))

    budget = rss_budget_mb(args, path)
    ordered = list(rows.values())
    text = table(ordered, work)
    checks = targets(rows, work, budget)
    heading = (
        f"Machine: {machine()}; {versions()}; foresight-lab {git_state()}; "
        f"model {args.model} ({path.name}, {path.stat().st_size / 1e6:.0f} MB); "
        f"{started:%Y-%m-%d %H:%M %Z}.\n"
        f"Load average (1 min) before the run {load_before[0]:.2f}; after each system: "
        + ", ".join(f"{k} {v[0]:.2f}" for k, v in loads.items())
        + "."
    )
    command = "python benchmarks/bench_serving.py " + " ".join(sys.argv[1:])
    report = f"{heading}\n\n`{command.strip()}`\n\n{text}\n"
    report += "\nTokens generated, as counted:\n\n" + "\n".join(counted(ordered, work)) + "\n"
    if checks:
        report += "\nTargets (DESIGN.md section 7):\n\n" + "\n".join(checks) + "\n"
    print("\n" + report)

    (results / "serving.md").write_text(report)
    raw = {
        "workload": dataclasses.asdict(work),
        "rss_budget_mb": budget,
        "rows": rows,
        "load_before": load_before,
        "loads_after": loads,
        "heading": heading,
    }
    (results / "serving.json").write_text(json.dumps(raw, indent=2, default=str))
    plot(ordered, work, results / "serving.png", f"{path.name}, {machine()}")
    (results / "serving.partial.json").unlink(missing_ok=True)
    print(f"Wrote {results / 'serving.md'}, serving.json and serving.png")


if __name__ == "__main__":
    main()
