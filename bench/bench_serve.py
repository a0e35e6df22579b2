"""Serving throughput and latency with continuous batching, against one-at-a-time and transformers `generate`.

Engine level: N concurrent clients submit chat turns to one `GenerationWorker` (the generation thread
behind `mmadapter serve`) at once and read their events as an HTTP handler would. The model is a
mid-size random LLaMA (8 x 768, vocab 32k) with a LLaMA-Adapter V1 adapter routed onto it (what
`mmadapter serve --adapter NAME=PATH` loads); prompts are 128 tokens, answers 64 tokens, greedy.

For 1, 4, 8 and 16 clients: aggregate tokens/s (all answers' tokens / time until the last ends),
p50/p95 time to first token and inter-token latency, for the batching worker (`--max-batch 16`),
the same worker one request at a time (`--max-batch 1`), and transformers `generate` on the same
prompts as one padded batch (V1 attached directly, no streaming). Extra rows: 8 clients split over
two V1 adapters, and 8 clients of which half ask for the base model. Ratios come from this one run.
Throughput is reported in wall time and in CPU time of the generating thread (the worker's thread, or
the caller's for `generate`; with one torch thread it does all the model work), which other processes on a
shared machine do not inflate; latencies are wall time.

    python bench/bench_serve.py [--quick] [--device cuda] [--threads 1] [--out bench/results/serve.json]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import torch
from bench_generate import randomize_adapter, word_tokenizer
from benchlib import RESULTS, write_results

from mmadapter.adapters import attach_adapter, build_base_model, make_config, save_adapter
from mmadapter.adapters.backbones.presets import llama_config
from mmadapter.serve.chat import ChatTurn
from mmadapter.serve.generate import TextDelta
from mmadapter.serve.loader import ServedModel, load_served_models
from mmadapter.serve.sampling import SamplingParams
from mmadapter.serve.worker import GenerationWorker


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def load(folder: Path, config, vocab: int, device: str, dtype: torch.dtype, layers: int) -> ServedModel:
    """Base + two V1 adapters saved to `folder`, loaded the way `mmadapter serve` loads them."""
    torch.manual_seed(0)
    base = build_base_model(config, device="cpu")
    base.save_pretrained(folder / "base")
    word_tokenizer(vocab).save_pretrained(folder / "base")
    adapters = {}
    for index, name in enumerate(("v1", "v1-other")):
        torch.manual_seed(0)
        model = build_base_model(config, device="cpu")
        torch.manual_seed(index + 1)  # each adapter its own prompts
        attach_adapter(model, make_config("llama-adapter-v1", prompt_length=10, adapted_layers=layers - 2))
        randomize_adapter(model)
        adapters[name] = save_adapter(model, folder / name, prompt_template="alpaca")
    return load_served_models(folder / "base", adapters, device=device, dtype=dtype)


def run_clients(worker: GenerationWorker, prompts: list[list[int]], models: list[str], params: SamplingParams):
    """Submit every prompt at once from its own thread; per-request TTFT, token arrival gaps and the wall time."""
    ttft: list[float] = []
    gaps: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(len(prompts) + 1)

    def client(ids: list[int], model: str) -> None:
        barrier.wait()
        start = time.perf_counter()
        job = worker.submit(ChatTurn("", adapter=model, params=params, prompt_ids=ids))
        last, first, mine = start, None, []
        for event in job.events(poll_seconds=1.0):
            if isinstance(event, TextDelta) and event.token_ids:
                now = time.perf_counter()
                if first is None:
                    first = now - start
                else:
                    mine += [(now - last) / len(event.token_ids)] * len(event.token_ids)
                last = now
                with lock:
                    tokens[0] += len(event.token_ids)
            elif not isinstance(event, TextDelta) and hasattr(event, "error"):
                raise RuntimeError(event.error)
        with lock:
            ttft.append(first)
            gaps.extend(mine)

    threads = [threading.Thread(target=client, args=(p, m)) for p, m in zip(prompts, models, strict=True)]
    for thread in threads:
        thread.start()
    generation_clock = time.pthread_getcpuclockid(worker._thread.ident)
    barrier.wait()
    start, cpu_start = time.perf_counter(), time.clock_gettime(generation_clock)
    for thread in threads:
        thread.join()
    elapsed, cpu = time.perf_counter() - start, time.clock_gettime(generation_clock) - cpu_start
    return {
        "tokens": tokens[0],
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(tokens[0] / elapsed, 2),
        "tokens_per_cpu_s": round(tokens[0] / cpu, 2),
        "ttft_p50_ms": round(1000 * percentile(ttft, 0.5), 1),
        "ttft_p95_ms": round(1000 * percentile(ttft, 0.95), 1),
        "itl_p50_ms": round(1000 * percentile(gaps, 0.5), 2),
        "itl_p95_ms": round(1000 * percentile(gaps, 0.95), 2),
    }


def run_generate(model, prompts: list[list[int]], new_tokens: int, device: str) -> dict:
    """transformers `generate` on the prompts as one left-padded batch (no streaming, so no TTFT)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = (
        torch.arange(width, device=device)[None]
        >= torch.tensor([width - len(p) for p in prompts], device=device)[:, None]
    ).long()
    start, cpu_start = time.perf_counter(), time.thread_time()
    with torch.inference_mode():
        output = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
    produced = (output.shape[1] - width) * len(prompts)
    return {
        "tokens": produced,
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(produced / elapsed, 2),
        "tokens_per_cpu_s": round(produced / cpu, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and 1/4 clients (~1 min on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--clients", default=None, help="comma-separated client counts (default 1,4,8,16)")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    )
    layers, width, vocab, prompt_length, new_tokens = (
        (4, 512, 32000, 64, 32) if args.quick else (8, 768, 32000, 128, 64)
    )
    counts = [int(c) for c in (args.clients or ("1,4" if args.quick else "1,4,8,16")).split(",")]
    config = llama_config(width, layers, width // 64, vocab=vocab)
    config.eos_token_id = None  # never stop early: every answer has exactly new_tokens tokens
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    generator = torch.Generator().manual_seed(0)
    prompts = [
        [1, *torch.randint(2, vocab, (prompt_length - 1,), generator=generator).tolist()] for _ in range(max(counts))
    ]

    with tempfile.TemporaryDirectory() as folder:
        served = load(Path(folder), config, vocab, args.device, dtype, layers)
        batching = GenerationWorker(served, max_queue=64, max_batch=16)
        single = GenerationWorker(served, max_queue=64, max_batch=1)
        torch.manual_seed(0)  # the same base and "v1" adapter, attached directly: for transformers' generate
        direct = build_base_model(config, device="cpu")
        attach_adapter(direct, make_config("llama-adapter-v1", prompt_length=10, adapted_layers=layers - 2))
        torch.manual_seed(1)
        randomize_adapter(direct)
        direct = direct.to(args.device, dtype).eval()
        try:
            run_clients(batching, prompts[:2], ["v1", "v1"], params.replace(max_new_tokens=4))  # warm-up
            rows = []
            for count in counts:
                chosen = prompts[:count]
                row = {"clients": count}
                row["batched"] = run_clients(batching, chosen, ["v1"] * count, params)
                row["one_at_a_time"] = run_clients(single, chosen, ["v1"] * count, params)
                row["generate"] = run_generate(direct, chosen, new_tokens, args.device)
                for other in ("one_at_a_time", "generate"):
                    for unit in ("tokens_per_s", "tokens_per_cpu_s"):
                        row[f"batched_vs_{other}_{unit}"] = round(row["batched"][unit] / row[other][unit], 2)
                rows.append(row)
            mixed = {}
            if 8 in counts:
                half = ["v1", "v1-other"] * 4
                mixed["two_adapters_8_clients"] = run_clients(batching, prompts[:8], half, params)
                mixed["half_base_8_clients"] = run_clients(batching, prompts[:8], ["v1", "base"] * 4, params)
                mixed["base_only_8_clients"] = run_clients(batching, prompts[:8], ["base"] * 8, params)
                one = next(r for r in rows if r["clients"] == 8)["batched"]
                for unit in ("tokens_per_s", "tokens_per_cpu_s"):
                    mixed[f"two_adapters_vs_one_{unit}"] = round(mixed["two_adapters_8_clients"][unit] / one[unit], 3)
                    mixed[f"half_base_vs_base_only_cost_{unit}"] = round(
                        mixed["base_only_8_clients"][unit] / mixed["half_base_8_clients"][unit], 3
                    )
        finally:
            batching.close()
            single.close()

    device = (
        torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor() or "cpu"
    )
    print(
        f"LLaMA {layers} x {width} (vocab {vocab}) + V1, {dtype}, {args.device} ({device}, {torch.get_num_threads()} threads)"
    )
    print(f"prompts {prompt_length} tokens, {new_tokens} new tokens greedy, all clients submit at once")
    print("tok/s: wall time; tok/cpu-s: CPU time of the generating thread (robust on a shared machine)")
    print(
        f"{'clients':>7} {'mode':<14} {'tok/s':>7} {'tok/cpu-s':>9} {'TTFT p50':>9} {'p95':>7} {'ITL p50':>8} "
        f"{'p95':>7} {'x 1-at-a-time (wall/cpu)':>25}"
    )
    for row in rows:
        for mode in ("batched", "one_at_a_time", "generate"):
            r = row[mode]
            ratio = (
                f"{row['batched_vs_one_at_a_time_tokens_per_s']} / {row['batched_vs_one_at_a_time_tokens_per_cpu_s']}"
                if mode == "batched"
                else ""
            )
            latency = (
                f"{r['ttft_p50_ms']:>9.0f} {r['ttft_p95_ms']:>7.0f} {r['itl_p50_ms']:>8.1f} {r['itl_p95_ms']:>7.1f}"
                if "ttft_p50_ms" in r
                else f"{'-':>9} {'-':>7} {'-':>8} {'-':>7}"
            )
            print(
                f"{row['clients']:>7} {mode:<14} {r['tokens_per_s']:>7.1f} {r['tokens_per_cpu_s']:>9.1f} {latency} "
                f"{ratio:>25}"
            )
    for name, value in mixed.items():
        shown = (
            f"{value['tokens_per_s']} tok/s, {value['tokens_per_cpu_s']} tok/cpu-s"
            if isinstance(value, dict)
            else value
        )
        print(f"{name}: {shown}")
    write_results(
        {
            "benchmark": "serve",
            "date": date.today().isoformat(),
            "device": args.device,
            "device_name": device,
            "dtype": str(dtype),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "model": {"layers": layers, "hidden": width, "vocab": vocab, "adapter": "llama-adapter-v1"},
            "prompt_tokens": prompt_length,
            "new_tokens": new_tokens,
            "results": rows,
            "mixed": mixed,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
