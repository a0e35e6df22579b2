"""Generation speed (tokens/s) of the base model vs LLaMA-Adapter V1, V2 (merged) and LoRA (merged).

All four are the same mid-size LLaMA with the same base weights, served the way `mmadapter serve`
serves them (`mmadapter.serve`: loader merge + generation engine, greedy, KV cache, streaming text),
in one process. Runs are interleaved (base, V1, V2, LoRA, base, …) and the median is kept, so
machine noise hits every model alike; read the ratios. On CPU the default is one thread timed by
its own CPU time, which other processes on a shared machine do not inflate. Target: every adapter >= 0.95x the base.
V2's visual prompt is computed once per request before decoding and reported separately.

    python bench/bench_generate.py [--quick] [--device cuda] [--out bench/results/generate.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from benchlib import RESULTS, Table, add_device_arguments, chosen_dtype, write_results
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from mmadapter.adapters import attach_adapter, build_base_model, make_config
from mmadapter.adapters.backbones.presets import llama_config
from mmadapter.serve.chat import visual_inputs
from mmadapter.serve.loader import ServedModel, merge_for_serving
from mmadapter.serve.sampling import SamplingParams

LABELS = {
    "llama-adapter-v1": "LLaMA-Adapter V1",
    "llama-adapter-v2 (merged)": "LLaMA-Adapter V2 (merged)",
    "lora r=16 (merged)": "LoRA r=16 (merged)",
}


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """One word per id, so decoding (part of serving) costs what a real vocabulary costs."""
    words = {"<pad>": 0, "<s>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", pad_token="<pad>")


def randomize_adapter(model: torch.nn.Module) -> None:
    """Trained-looking adapter values (zero-init gates, biases and LoRA B would make merging trivial)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(tag in name for tag in ("adapter_", "lora_", "visual_projector")):
                param.add_(0.02 * torch.randn(param.shape, generator=generator).to(param.device, param.dtype))


ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {
    "base": None,
    "llama-adapter-v1": ("llama-adapter-v1", {"prompt_length": 10}),
    "llama-adapter-v2 (merged)": (
        "llama-adapter-v2",
        {"clip_model": "mmadapter-tiny-vit-64", "visual_width": 64, "visual_depth": 2, "visual_heads": 2},
    ),
    "lora r=16 (merged)": ("lora", {"r": 16, "alpha": 16.0, "dropout": 0.0, "target_modules": ALL_LINEARS}),
}


def build(name: str, config: LlamaConfig, tokenizer, device: str, dtype: torch.dtype) -> ServedModel:
    torch.manual_seed(0)  # identical base weights for every variant
    model = build_base_model(config, device=device, dtype=dtype).requires_grad_(False)
    spec = VARIANTS[name]
    if spec is not None:
        method, options = spec
        if method == "llama-adapter-v1":
            options = {**options, "adapted_layers": config.num_hidden_layers - 2}  # official: 30 of 32
        attach_adapter(model, make_config(method, **options))
        randomize_adapter(model)
        merge_for_serving(model)
    return ServedModel.from_model(model.eval(), tokenizer, name=name)


def timed(served: ServedModel, prompt: list[int], params: SamplingParams, inputs: dict, clock) -> float:
    if served.model.device.type == "cuda":
        torch.cuda.synchronize()
    start = clock()
    [completion] = served.engine.generate([prompt], params, inputs)
    if served.model.device.type == "cuda":
        torch.cuda.synchronize()
    assert completion.completion_tokens == params.max_new_tokens
    return params.max_new_tokens / (clock() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model, fewer tokens and rounds (~1 min on CPU)")
    add_device_arguments(parser, "torch CPU threads (default 1: see --clock)")
    parser.add_argument(
        "--clock",
        choices=("auto", "cpu", "wall"),
        default="auto",
        help="cpu: CPU time of the generating thread, robust on a shared machine (CPU, 1 thread); wall: elapsed "
        "time (CUDA, or several threads); auto picks",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "generate.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu_clock = args.clock == "cpu" or (args.clock == "auto" and args.device == "cpu" and args.threads == 1)
    clock = time.thread_time if cpu_clock else time.perf_counter
    dtype = chosen_dtype(args)
    layers, width, vocab, prompt_length, new_tokens, rounds = (
        (4, 512, 32000, 64, 32, 5) if args.quick else (8, 768, 32000, 128, 96, 7)
    )
    config = llama_config(width, layers, width // 64, vocab=vocab)
    config.eos_token_id = None  # never stop early: every run generates exactly the asked number of tokens
    tokenizer = word_tokenizer(vocab)
    models = {name: build(name, config, tokenizer, args.device, dtype) for name in VARIANTS}
    prompt = [1, *torch.randint(2, vocab, (prompt_length - 1,), generator=torch.Generator().manual_seed(0)).tolist()]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)

    inputs, visual_ms = {}, {}
    for name, served in models.items():
        start = time.perf_counter()
        inputs[name] = visual_inputs(served, None) if served.takes_images else {}
        visual_ms[name] = 1000 * (time.perf_counter() - start) if served.takes_images else None
        timed(served, prompt, params, inputs[name], clock)  # warm-up
    speeds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, served in models.items():
            speeds[name].append(timed(served, prompt, params, inputs[name], clock))

    base = statistics.median(speeds["base"])
    rows = []
    for name in models:
        tokens_per_s = statistics.median(speeds[name])
        row = {"model": name, "tokens_per_s": round(tokens_per_s, 2), "ratio_to_base": round(tokens_per_s / base, 3)}
        rows.append({**row, "ms_per_token": round(1000 / tokens_per_s, 3), "visual_prompt_ms": visual_ms[name]})
    device = (
        torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor() or "cpu"
    )
    threads = torch.get_num_threads()
    print(f"LLaMA {layers} layers x {width} (vocab {vocab}), {dtype}, {args.device} ({device}, {threads} threads)")
    clock_name = "CPU time of the generating thread" if cpu_clock else "wall time"
    print(
        f"prompt {prompt_length} tokens, {new_tokens} new tokens greedy, median of {rounds} interleaved runs ({clock_name})"
    )
    table = Table(["model", "tokens/s", "ms/token", "× base"])
    for row in rows:
        label = LABELS.get(row["model"], row["model"])
        table.add(label, f"{row['tokens_per_s']:.1f}", f"{row['ms_per_token']:.2f}", f"{row['ratio_to_base']:.3f}")
    table.print()
    lowest = min(row["ratio_to_base"] for row in rows)
    print(f"target: every adapter >= 0.95x base -> {'met' if lowest >= 0.95 else 'NOT met'} (lowest {lowest:.3f})")
    report = {
        "benchmark": "generate",
        "date": date.today().isoformat(),
        "device": args.device,
        "device_name": device,
        "dtype": str(dtype),
        "threads": torch.get_num_threads(),
        "clock": "thread_cpu" if cpu_clock else "wall",
        "torch": torch.__version__,
        "model": {"layers": layers, "hidden": width, "vocab": vocab, "heads": width // 64},
        "prompt_tokens": prompt_length,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "results": rows,
        "all_runs_tokens_per_s": speeds,
    }
    write_results(report, args.out, {"tokens": table})


if __name__ == "__main__":
    main()
