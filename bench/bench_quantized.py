"""Decoding speed of a 4-bit (NF4) base on a CPU: bitsandbytes' CPU repacking off (as a loaded base has it, so
that it can train) against on (as `mmadapter serve` turns it, on CPUs with AVX512-BF16).

One mid-size LLaMA saved as a Hugging Face folder, loaded twice through `load_base_model` with the same
quantization, served by the generation engine (greedy, KV cache). Runs are interleaved and the median is kept;
read the ratio. On a CPU without AVX512-BF16 both rows take the same kernel (ratio ~1).

    python bench/bench_quantized.py [--quick] [--threads N] [--out bench/results/quantized.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from bench_generate import timed, word_tokenizer
from benchlib import RESULTS, Table, write_results

from mmadapter.adapters import build_base_model, load_base_model
from mmadapter.adapters.backbones.presets import llama_config
from mmadapter.adapters.backbones.quantization import set_cpu_4bit_repacking
from mmadapter.core.quantization import Quantization
from mmadapter.serve.loader import ServedModel
from mmadapter.serve.sampling import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model, fewer tokens and rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "quantized.json")
    args = parser.parse_args()
    import bitsandbytes  # after mmadapter's imports, which keep its import-time notice out of the log

    torch.set_num_threads(args.threads)
    layers, width, vocab, prompt_length, new_tokens, rounds = (
        (4, 512, 32000, 32, 16, 3) if args.quick else (8, 1024, 32000, 64, 32, 5)
    )
    config = llama_config(width, layers, width // 64, vocab=vocab)
    config.eos_token_id = None  # never stop early
    quantization = Quantization(bits=4)  # NF4, bf16 compute, double quantization: the defaults
    tokenizer = word_tokenizer(vocab)
    models = {}
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        build_base_model(config).save_pretrained(folder)
        for repacking in ("off", "on"):
            model = load_base_model(folder, device="cpu", quantization=quantization).eval()
            set_cpu_4bit_repacking(model, enabled=repacking == "on")
            models[repacking] = ServedModel.from_model(model, tokenizer, name=f"repacking {repacking}")
    prompt = [1, *torch.randint(2, vocab, (prompt_length - 1,), generator=torch.Generator().manual_seed(0)).tolist()]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    for served in models.values():
        timed(served, prompt, params, {}, time.perf_counter)  # warm-up (and the repacking, where it happens)
    speeds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, served in models.items():
            speeds[name].append(timed(served, prompt, params, {}, time.perf_counter))

    kernel = bool(bitsandbytes.functional.has_avx512bf16())
    off = statistics.median(speeds["off"])
    threads = f"{args.threads} thread{'s' if args.threads > 1 else ''}"
    print(
        f"LLaMA {layers} layers x {width} (vocab {vocab}) in NF4, cpu ({platform.processor() or 'cpu'}, {threads}, "
        f"AVX512-BF16 kernel {'available' if kernel else 'not available'})"
    )
    print(f"prompt {prompt_length} tokens, {new_tokens} new tokens greedy, median of {rounds} interleaved runs")
    table = Table(["CPU repacking", "tokens/s", "× off"])
    rows = []
    for name in models:
        median = statistics.median(speeds[name])
        rows.append({"repacking": name, "tokens_per_s": round(median, 2), "ratio_to_off": round(median / off, 3)})
        table.add(name, f"{median:.1f}", f"{median / off:.2f}")
    table.print()
    report = {
        "benchmark": "quantized",
        "date": date.today().isoformat(),
        "device": "cpu",
        "avx512_bf16_kernel": kernel,
        "threads": args.threads,
        "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "model": {"layers": layers, "hidden": width, "vocab": vocab, "heads": width // 64},
        "prompt_tokens": prompt_length,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "results": rows,
        "all_runs_tokens_per_s": speeds,
    }
    write_results(report, args.out, {"decode": table})


if __name__ == "__main__":
    main()
