"""Decoding step time of the serving scheduler with transformers' concatenating KV cache vs `serve.kv_cache`.

The batch scheduler (`serve.batching.BatchScheduler`, what `mmadapter serve` runs) decodes the same rows of
the mid-size LLaMA of bench_serve.py (8 x 768, vocab 32k, fp32, base model) twice per round: once with
`serve.kv_cache.new_kv_cache` (layers that grow in place) and once with a plain `DynamicCache` (every token
concatenated onto every layer's keys and values). Each run prefills `rows` prompts of `prompt` tokens together
and decodes 64 tokens greedily; the figure is the median decoding step (ms), prefill excluded. Variants are
interleaved and the median of the rounds is kept; the ratio is the one to read. On CPU: one thread.

    python bench/bench_kv_cache.py [--quick] [--device cuda] [--out bench/results/kv_cache.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from bench_generate import word_tokenizer
from benchlib import RESULTS, Table, add_device_arguments, chosen_dtype, run_header, write_results
from transformers import DynamicCache

import mmadapter.serve.batching as batching
from mmadapter.adapters import build_base_model
from mmadapter.adapters.backbones.presets import llama_config
from mmadapter.serve.batching import BatchScheduler, GenerationRequest
from mmadapter.serve.generate import GenerationEngine
from mmadapter.serve.kv_cache import new_kv_cache
from mmadapter.serve.sampling import SamplingParams

NEW_TOKENS = 64
CACHES = {
    "grows in place (serve.kv_cache)": new_kv_cache,
    "concatenates (DynamicCache)": lambda config: DynamicCache(config=config),
}


def decode_step_ms(engine: GenerationEngine, prompts: list[list[int]], make_cache) -> float:
    """Median wall time of the scheduler's decoding steps for `prompts` sent together, with `make_cache`."""
    batching.new_kv_cache = make_cache  # what the scheduler builds its prefill cache with
    scheduler = BatchScheduler(engine, max_batch=len(prompts), prefill_tokens=10**6)  # one prefill step
    for prompt in prompts:
        scheduler.add(GenerationRequest(prompt, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0)))
    scheduler.step()  # the prefill, and a first decoding step
    steps = []
    while not scheduler.idle:
        start = time.perf_counter()
        scheduler.step()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        steps.append(time.perf_counter() - start)
    return 1000 * statistics.median(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer shapes (~20 s on CPU)")
    add_device_arguments(parser, "torch CPU threads (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, medians kept (default 3)")
    parser.add_argument("--out", type=Path, default=RESULTS / "kv_cache.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = chosen_dtype(args)
    layers, width = (4, 512) if args.quick else (8, 768)
    shapes = [(1, 128), (8, 128)] if args.quick else [(1, 128), (8, 128), (1, 1024), (8, 512), (16, 128)]
    config = llama_config(width, layers, width // 64, vocab=32000)
    config.eos_token_id = None  # every answer is NEW_TOKENS long
    torch.manual_seed(0)
    model = build_base_model(config, device=args.device, dtype=dtype).requires_grad_(False)
    engine = GenerationEngine(model, word_tokenizer(config.vocab_size))
    generator = torch.Generator().manual_seed(0)
    results = []
    for rows, prompt in shapes:
        prompts = [torch.randint(2, config.vocab_size, (prompt,), generator=generator).tolist() for _ in range(rows)]
        decode_step_ms(engine, prompts[:1], new_kv_cache)  # warm-up
        rounds = {name: [] for name in CACHES}
        for _ in range(args.rounds):
            for name, make_cache in CACHES.items():
                rounds[name].append(decode_step_ms(engine, prompts, make_cache))
        medians = {name: round(statistics.median(times), 2) for name, times in rounds.items()}
        results.append({"rows": rows, "prompt_tokens": prompt, "step_ms": medians})
        print(f"{rows} x {prompt}: " + ", ".join(f"{name} {ms} ms" for name, ms in medians.items()))
    batching.new_kv_cache = new_kv_cache

    table = Table(["rows × prompt tokens", *(f"{name} ms/step" for name in CACHES), "speed-up"])
    growing, concatenating = CACHES
    for result in results:
        steps = result["step_ms"]
        table.add(
            f"{result['rows']} × {result['prompt_tokens']}",
            steps[growing],
            steps[concatenating],
            f"{steps[concatenating] / steps[growing]:.2f}×",
        )
    header = run_header("kv_cache", args, dtype)
    print(
        f"\nLLaMA {layers} x {width} (vocab 32000), {header['dtype']}, {header['device_name']}, {NEW_TOKENS} new tokens"
    )
    table.print()
    document = {
        **header,
        "model": {"layers": layers, "hidden": width, "vocab": 32000},
        "new_tokens": NEW_TOKENS,
        "rounds": args.rounds,
        "results": results,
    }
    write_results(document, args.out, {"steps": table})


if __name__ == "__main__":
    main()
