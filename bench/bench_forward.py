"""Forward cost of LLaMA-Adapter V1 against the frozen base model, side by side in one process.

Prints a table and writes JSON. Runs are interleaved (base, adapter, base, adapter, …), each on one
torch thread timed by its own CPU time, and the median is kept, so other processes on a shared machine
skew neither side; the ratio is what to read.

    python bench/bench_forward.py [--quick] [--out bench/results/forward.json]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from benchlib import RESULTS, Table, write_results

from mmadapter.adapters import attach_adapter, build_base_model, make_config
from mmadapter.adapters.backbones.presets import llama_config


def median_ms(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        run()
        times.append(time.thread_time() - start)
    return 1000 * statistics.median(times)


@torch.no_grad()
def measure(model, ids, repeats: int) -> dict[str, float]:
    """Prefill of the whole batch, and one decoding step on top of its cache."""
    prefill = model(ids, use_cache=True)
    cache = prefill.past_key_values
    next_ids = prefill.logits[:, -1:].argmax(-1)

    def decode():
        model(next_ids, past_key_values=cache, use_cache=True)
        cache.crop(-1)  # drop the new token: every timed step decodes at the same position

    # A decoding step is ~40x shorter than a prefill, so it gets more repeats for an equally steady median.
    return {"prefill_ms": median_ms(lambda: model(ids), repeats), "decode_ms": median_ms(decode, 10 * repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model and fewer repeats")
    parser.add_argument("--out", type=Path, default=RESULTS / "forward.json")
    args = parser.parse_args()
    layers, width, seq, batch, repeats = (4, 256, 128, 2, 5) if args.quick else (8, 512, 256, 4, 10)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = llama_config(width, layers, width // 64, vocab=4096)
    base = build_base_model(config)
    adapted = copy.deepcopy(base)
    attach_adapter(adapted, make_config("llama-adapter-v1", adapted_layers=layers - 1, prompt_length=10))
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    results = {"base": [], "llama-adapter-v1": []}
    for _ in range(3):  # interleave the two models so noise hits both
        results["base"].append(measure(base, ids, repeats))
        results["llama-adapter-v1"].append(measure(adapted, ids, repeats))
    rows = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    print(f"LLaMA {layers} layers x {width}, batch {batch} x {seq} tokens; V1 on {layers - 1} layers, K=10")
    table = Table(["model", "prefill ms", "× base", "decode step ms", "× base"])
    for name, row in rows.items():
        row["prefill_ratio"] = row["prefill_ms"] / rows["base"]["prefill_ms"]
        row["decode_ratio"] = row["decode_ms"] / rows["base"]["decode_ms"]
        label = {"base": "base", "llama-adapter-v1": "LLaMA-Adapter V1"}[name]
        table.add(
            label,
            f"{row['prefill_ms']:.1f}",
            f"{row['prefill_ratio']:.3f}",
            f"{row['decode_ms']:.2f}",
            f"{row['decode_ratio']:.3f}",
        )
    table.print()
    result = {
        "date": date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "config": {"layers": layers, "width": width, "seq": seq, "batch": batch},
        "rows": rows,
    }
    write_results(result, args.out, {"v1": table})


if __name__ == "__main__":
    main()
