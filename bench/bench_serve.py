"""Serving under HTTP load: continuous batching against one request at a time and transformers `generate`.

The real server (`serve.http_server.APIServer`, FastAPI + uvicorn on 127.0.0.1, an ephemeral port) runs in a
child process per configuration, loaded the way `mmadapter serve --base B --adapter v1=... --adapter
v1-other=...` loads it: a mid-size random LLaMA (8 x 768, vocab 32k) with LLaMA-Adapter V1 adapters routed onto
it. N streaming clients (threads of this process, plain HTTP/1.1, `"stream": true`) send a 128-token prompt at
once and read 64 new tokens each (greedy; the model has no end-of-sequence token, so every answer is 64 long).

For 1, 4, 8 and 16 clients: aggregate tokens/s (all answers' tokens / time until the last one ends), p50/p95
time to first token and inter-token latency as the clients see them, for the server with `--max-batch 16`,
the same server with `--max-batch 1` (one request at a time), and transformers `generate` on the same prompt
ids as one padded batch (V1 attached directly, in this process, no HTTP). Then 8 clients split over two
adapters vs one, and base-model traffic on the adapter server (alone, and half of a mixed batch) vs a server
of the base model alone. Modes run interleaved (for each client count: batched, one at a time, generate).

The machine may be shared, so next to wall time every throughput is also given per CPU second of the server
process (all its threads: HTTP, tokenizer, generation; for `generate` the calling thread), which other
processes' load does not inflate. Latencies are wall time. The tables printed are stored in the JSON under
"tables" (docs/benchmarks.md renders them).

    python bench/bench_serve.py [--quick] [--device cuda] [--threads 1] [--out bench/results/serve.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from bench_generate import randomize_adapter, word_tokenizer
from benchlib import RESULTS, GPUClock, Table, add_device_arguments, chosen_dtype, run_header, write_results

from mmadapter.adapters import attach_adapter, build_base_model, make_config, save_adapter
from mmadapter.adapters.backbones.presets import llama_config

ADAPTERS = ("v1", "v1-other")
TARGETS = {"batched_8": 2.5, "two_adapters": 0.85, "base_rows": 1.05}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


# ------------------------------------------------------------------------------------------ the server process


def serve_child(args: argparse.Namespace) -> None:
    """Child process: serve the folder's base (+ adapters) on an ephemeral port; answer CPU-time queries on stdin."""
    from mmadapter.serve.api_settings import ServerSettings
    from mmadapter.serve.http_server import APIServer
    from mmadapter.serve.loader import load_served_models

    torch.set_num_threads(args.threads)
    folder = Path(args.child)
    adapters = {name: folder / name for name in args.adapters.split(",") if name}
    served = load_served_models(folder / "base", adapters, device=args.device, dtype=args.dtype)
    settings = ServerSettings(port=0, max_batch=args.max_batch, max_queue=64)
    server = APIServer(served, settings)
    server.start_background()
    print(f"PORT {server.server_address[1]}", flush=True)
    generation = time.pthread_getcpuclockid(server.worker._thread.ident)
    for _ in sys.stdin:  # each line asks for the CPU seconds so far (process, generation thread); EOF ends it
        print(f"CPU {time.process_time()} {time.clock_gettime(generation)}", flush=True)
    server.close()


class ServerProcess:
    """`mmadapter serve`'s HTTP server in a child process, whose CPU time can be read."""

    def __init__(self, folder: Path, adapters: tuple[str, ...], max_batch: int, args: argparse.Namespace) -> None:
        command = [sys.executable, __file__, "--child", str(folder), "--adapters", ",".join(adapters)]
        command += ["--max-batch", str(max_batch), "--threads", str(args.threads), "--device", args.device]
        command += ["--dtype", args.dtype]
        self.device = args.device
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.port = int(self._answer("PORT")[0])

    def _answer(self, tag: str) -> list[str]:
        for line in self.process.stdout:
            if line.startswith(f"{tag} "):
                return line.split()[1:]
        raise RuntimeError(f"the server process ended (exit code {self.process.wait()})")

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU seconds so far of the whole process and of its generation thread."""
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        process, generation = map(float, self._answer("CPU"))
        return process, generation

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(60)


# ------------------------------------------------------------------------------------------ the clients


def stream_chat(port: int, model: str, message: str, new_tokens: int) -> tuple[float, list[float], int]:
    """One streaming chat request: (time to first token, per-token gaps, completion tokens)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": message}],
        "max_tokens": new_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    first, last, gaps, tokens = None, start, [], 0
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        text = "".join(choice["delta"].get("content") or "" for choice in chunk["choices"])
        if text:
            now = time.perf_counter()
            count = max(1, len(text.split()))  # one word per token (bench_generate.word_tokenizer)
            if first is None:
                first = now - start
            else:
                gaps += [(now - last) / count] * count
            last = now
    connection.close()
    return first, gaps, tokens


def throughput(tokens: int, seconds: float, cpu_seconds: float) -> dict:
    return {
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2),
        "tokens_per_cpu_s": round(tokens / cpu_seconds, 2),
    }


def run_clients(server: ServerProcess, messages: list[str], models: list[str], new_tokens: int) -> dict:
    """Every client sends at once; aggregate throughput (wall and server CPU) and latency percentiles."""
    results: list = [None] * len(messages)
    barrier = threading.Barrier(len(messages) + 1)

    def client(index: int) -> None:
        barrier.wait()
        results[index] = stream_chat(server.port, models[index], messages[index], new_tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(messages))]
    for thread in threads:
        thread.start()
    cpu_start = server.cpu_seconds()
    with GPUClock(server.device) as clock:
        barrier.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
    elapsed, cpu = time.perf_counter() - start, [b - a for a, b in zip(cpu_start, server.cpu_seconds(), strict=True)]
    if any(result is None for result in results):
        raise RuntimeError("a client failed (see above)")
    tokens = sum(result[2] for result in results)
    gaps = [gap for result in results for gap in result[1]]
    ttft = [result[0] for result in results]
    return {
        **throughput(tokens, elapsed, cpu[0]),
        "generation_thread_cpu_share": round(cpu[1] / cpu[0], 3),
        "ttft_p50_ms": round(1000 * percentile(ttft, 0.5), 1),
        "ttft_p95_ms": round(1000 * percentile(ttft, 0.95), 1),
        "itl_p50_ms": round(1000 * percentile(gaps, 0.5), 2),
        "itl_p95_ms": round(1000 * percentile(gaps, 0.95), 2),
        **clock_field(clock),
    }


def clock_field(clock: GPUClock) -> dict:
    return {} if clock.median_mhz is None else {"gpu_clock_mhz": clock.median_mhz}


def run_generate(model, prompts: list[list[int]], new_tokens: int, device: str) -> dict:
    """transformers `generate` on the prompt ids as one left-padded batch (no streaming, so no latencies)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    mask = (torch.arange(width, device=device)[None] >= width - lengths[:, None]).long()
    start, cpu_start = time.perf_counter(), time.thread_time()
    with GPUClock(device) as clock, torch.inference_mode():
        output = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
    return {**throughput((output.shape[1] - ids.shape[1]) * len(prompts), elapsed, cpu), **clock_field(clock)}


def measure(servers, model, messages, ids, counts, mix, new_tokens, device) -> tuple[list[dict], dict]:
    """One round: for each client count batched, one at a time and generate in turn; then the adapter mixes."""
    rows = []
    for count in counts:
        row = {"clients": count}
        for mode in ("batched", "one_at_a_time"):
            row[mode] = run_clients(servers[mode], messages[:count], ["v1"] * count, new_tokens)
        row["generate"] = run_generate(model, ids[:count], new_tokens, device)
        rows.append(row)
        print(f"{count} clients: " + ", ".join(f"{m} {row[m]['tokens_per_s']} tok/s" for m in row if m != "clients"))
    chosen, batched = messages[:mix], servers["batched"]
    mixed = {
        "one_adapter": run_clients(batched, chosen, ["v1"] * mix, new_tokens),
        "two_adapters": run_clients(batched, chosen, [*ADAPTERS] * (mix // 2), new_tokens),
        "base_server": run_clients(servers["base"], chosen, ["base"] * mix, new_tokens),
        "base_on_adapter_server": run_clients(batched, chosen, ["base"] * mix, new_tokens),
        "half_base": run_clients(batched, chosen, ["base", "v1"] * (mix // 2), new_tokens),
    }
    return rows, mixed


def median_of(results: list[dict]) -> dict:
    """Field by field median of several rounds' result dicts (nested dicts alike)."""
    first = results[0]
    return {
        key: median_of([r[key] for r in results])
        if isinstance(value, dict)
        else value
        if key == "clients"
        else round(statistics.median(r[key] for r in results), 3)
        for key, value in first.items()
    }


# ------------------------------------------------------------------------------------------ setup


def save_models(folder: Path, config, vocab: int, layers: int) -> None:
    """Base (+ word tokenizer) and two V1 adapters with their own random prompts, as `mmadapter serve` reads them."""
    torch.manual_seed(0)
    base = build_base_model(config, device="cpu")
    base.save_pretrained(folder / "base")
    word_tokenizer(vocab).save_pretrained(folder / "base")
    for index, name in enumerate(ADAPTERS):
        torch.manual_seed(0)
        model = build_base_model(config, device="cpu")
        torch.manual_seed(index + 1)
        attach_adapter(model, make_config("llama-adapter-v1", prompt_length=10, adapted_layers=layers - 2))
        randomize_adapter(model)
        save_adapter(model, folder / name, prompt_template="alpaca")


def make_messages(served, count: int, prompt_tokens: int, vocab: int) -> tuple[list[str], list[list[int]]]:
    """`count` user messages of random words whose templated prompt is `prompt_tokens` long, and those prompt ids."""
    from mmadapter.serve.chat import ChatTurn, prompt_ids

    overhead = len(prompt_ids(served, ChatTurn("w2"))) - 1
    generator = torch.Generator().manual_seed(0)
    messages = [
        " ".join(f"w{i}" for i in torch.randint(2, vocab, (prompt_tokens - overhead,), generator=generator).tolist())
        for _ in range(count)
    ]
    ids = [prompt_ids(served, ChatTurn(message)) for message in messages]
    assert all(len(prompt) == prompt_tokens for prompt in ids), [len(prompt) for prompt in ids]
    return messages, ids


# ------------------------------------------------------------------------------------------ tables


def ms(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def load_table(rows: list[dict]) -> Table:
    columns = ["clients", "mode", "tok/s", "tok/CPU-s", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms", "ITL p95 ms"]
    columns += ["× one-at-a-time (wall)", "× one-at-a-time (CPU)"]
    clocked = any("gpu_clock_mhz" in row[mode] for row in rows for mode in ("batched", "generate"))
    table = Table(columns + (["GPU MHz"] if clocked else []))
    names = {"batched": "batched (--max-batch 16)", "one_at_a_time": "one at a time (--max-batch 1)"}
    names["generate"] = "transformers generate"
    for row in rows:
        single = row["one_at_a_time"]
        for mode, label in names.items():
            r = row[mode]
            latency = (
                [ms(r["ttft_p50_ms"]), ms(r["ttft_p95_ms"]), ms(r["itl_p50_ms"]), ms(r["itl_p95_ms"])]
                if "ttft_p50_ms" in r
                else ["–"] * 4
            )
            ratios = [
                f"{r[unit] / single[unit]:.2f}×" if mode != "one_at_a_time" else "1×"
                for unit in ("tokens_per_s", "tokens_per_cpu_s")
            ]
            clock = [f"{r['gpu_clock_mhz']:.0f}" if "gpu_clock_mhz" in r else "–"] if clocked else []
            table.add(
                row["clients"], label, f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_cpu_s']:.1f}", *latency, *ratios,
                *clock,
            )  # fmt: skip
    return table


def mixed_table(mixed: dict, clients: int) -> Table:
    """Adapters and base traffic at `clients` clients; ratios against the row named in `against`."""
    table = Table(["traffic", "server", "tok/s", "tok/CPU-s", "ITL p50 ms", "vs", "ratio (wall)", "ratio (CPU)"])
    rows = [
        ("one_adapter", "all v1", "v1 + v1-other", None, False),
        ("two_adapters", "half v1, half v1-other", "v1 + v1-other", "one_adapter", False),
        ("base_server", "all base", "base only", None, False),
        ("base_on_adapter_server", "all base", "v1 + v1-other", "base_server", True),
        ("half_base", "half base, half v1", "v1 + v1-other", "base_server", True),
    ]
    for key, traffic, server, against, cost in rows:
        r = mixed[key]
        cells = ["", "", ""]
        if against is not None:
            other = mixed[against]
            # cost: seconds per token relative to the reference (>1 is slower); else throughput relative to it
            ratio = {u: (other[u] / r[u] if cost else r[u] / other[u]) for u in ("tokens_per_s", "tokens_per_cpu_s")}
            what = "cost per token" if cost else "throughput"
            cells = [f"{what} vs {against.replace('_', ' ')}", *(f"{ratio[u]:.3f}" for u in ratio)]
        table.add(
            f"{clients} clients: {traffic}",
            server,
            f"{r['tokens_per_s']:.1f}",
            f"{r['tokens_per_cpu_s']:.1f}",
            ms(r["itl_p50_ms"]),
            *cells,
        )
    return table


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model, 1/4 clients (~1 min on CPU)")
    add_device_arguments(parser, "torch CPU threads per process (default 1)")
    parser.add_argument("--clients", default=None, help="comma-separated client counts (default 1,4,8,16)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds, medians kept (default 2; quick 1)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "serve.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one server (see ServerProcess)
    parser.add_argument("--adapters", default="", help=argparse.SUPPRESS)
    parser.add_argument("--max-batch", type=int, default=16, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = str(chosen_dtype(args)).removeprefix("torch.")
    if args.child:
        serve_child(args)
        return
    torch.set_num_threads(args.threads)
    args.rounds = args.rounds or (1 if args.quick else 2)
    layers, width, vocab, prompt_tokens, new_tokens = (
        (4, 512, 32000, 64, 32) if args.quick else (8, 768, 32000, 128, 64)
    )
    counts = [int(c) for c in (args.clients or ("1,4" if args.quick else "1,4,8,16")).split(",")]
    mix = 4 if args.quick else 8
    config = llama_config(width, layers, width // 64, vocab=vocab)
    config.eos_token_id = None  # never stop early: every answer has exactly new_tokens tokens

    from mmadapter.serve.loader import load_served_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_models(folder, config, vocab, layers)
        # V1 attached directly (not routed), for transformers' generate; its template makes the prompt ids.
        direct = load_served_model(folder / "base", folder / "v1", device=args.device, dtype=args.dtype, merge=False)
        messages, ids = make_messages(direct, max(*counts, mix), prompt_tokens, vocab)
        servers = {
            "batched": ServerProcess(folder, ADAPTERS, 16, args),
            "one_at_a_time": ServerProcess(folder, ADAPTERS, 1, args),
            "base": ServerProcess(folder, (), 16, args),
        }
        try:
            for server in servers.values():  # warm-up
                run_clients(server, messages[:2], ["base"] * 2, 4)
            run_generate(direct.model, ids[:2], 4, args.device)
            rounds = [
                measure(servers, direct.model, messages, ids, counts, mix, new_tokens, args.device)
                for _ in range(args.rounds)
            ]
            rows = [median_of([r[0][i] for r in rounds]) for i in range(len(counts))]
            mixed = median_of([r[1] for r in rounds])
        finally:
            for server in servers.values():
                server.close()

    header = run_header("serve", args, args.dtype)
    print(
        f"LLaMA {layers} x {width} (vocab {vocab}) + V1 routed, {args.dtype}, {args.device} ({header['device_name']}, "
        f"{args.threads} torch thread(s) per process)"
    )
    print(f"prompts {prompt_tokens} tokens, {new_tokens} new tokens greedy, streaming HTTP clients all sending at once")
    print("tok/s: wall time; tok/CPU-s: per CPU second of the server process (generate: of its thread)")
    tables = {"load": load_table(rows), "adapters": mixed_table(mixed, mix)}
    targets = Table(["target", "wall", "CPU", "holds (CPU)"])
    by_count = {row["clients"]: row for row in rows}
    checks = []
    if 8 in by_count:
        checks.append(
            (
                "8 clients ≥ 2.5× one at a time",
                by_count[8]["batched"],
                by_count[8]["one_at_a_time"],
                False,
                TARGETS["batched_8"],
            )
        )
    checks.append(
        (
            f"two adapters ≥ {TARGETS['two_adapters']}× one adapter",
            mixed["two_adapters"],
            mixed["one_adapter"],
            False,
            TARGETS["two_adapters"],
        )
    )
    checks.append(
        (
            f"base rows in a mixed batch ≤ {TARGETS['base_rows']}× a base-only server (cost per token)",
            mixed["half_base"],
            mixed["base_server"],
            True,
            TARGETS["base_rows"],
        )
    )
    for name, this, other, cost, limit in checks:
        ratio = {u: (other[u] / this[u] if cost else this[u] / other[u]) for u in ("tokens_per_s", "tokens_per_cpu_s")}
        holds = ratio["tokens_per_cpu_s"] <= limit if cost else ratio["tokens_per_cpu_s"] >= limit
        targets.add(name, f"{ratio['tokens_per_s']:.2f}", f"{ratio['tokens_per_cpu_s']:.2f}", "yes" if holds else "no")
    tables["targets"] = targets
    for name, table in tables.items():
        print(f"\n[{name}]")
        table.print()
    document = {
        **header,
        "model": {"layers": layers, "hidden": width, "vocab": vocab, "adapter": "llama-adapter-v1"},
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "results": rows,
        "mixed": mixed,
        "mixed_clients": mix,
    }
    write_results(document, args.out, tables)


if __name__ == "__main__":
    main()
