"""mmadapter against peft on the same LLaMA configs, side by side in one process: ratios, not absolute times.

- LLaMA-Adapter V1 (ours: prompt branch inside transformers' attention call, prompt keys/values cached
  while generating) vs peft's AdaptionPrompt (wraps the attention module, recomputes the query and the
  prompt keys/values on every call). Targets: ours <= 0.9x peft's train-step time, >= 1.1x its
  generation tokens/s.
- P-Tuning v2 on LLaMA (ours: a decoder pre-hook fills the KV cache) vs peft's PrefixTuning. Target: no
  slower.

Correctness first: at zero-init V1 and AdaptionPrompt must both return the base model's logits
exactly (asserted), and with the same prompts and one shared gate value (ours with `gate_tanh=False`,
the only difference in their math) they must agree to float32 rounding (asserted, reported). Prefix
tuning has no zero-init, and ours keeps token positions unshifted by the prefix (ChatGLM's official
semantics) where peft shifts them, so only its speed and memory are compared.

Timing: interleaved rounds (ours, peft, ours, …), median kept. On a CPU everything runs on one thread
and is timed by this process's CPU time, so other processes on a shared machine do not skew the
ratio; on a GPU by wall time after synchronising. Memory of a train step is accounted on the CPU
(weights + trainable gradients + AdamW moments + tensors saved for backward, each storage once);
on a GPU it is `torch.cuda.max_memory_allocated`.

    python bench/bench_peers.py [--quick] [--device cuda] [--out bench/results/peers.json]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from benchlib import RESULTS, Table, saved_for_backward, write_results
from transformers import LlamaConfig

from mmadapter.adapters import attach_adapter, build_base_model, make_config, mark_trainable
from mmadapter.adapters.backbones.presets import llama_config

#: name -> (config, batch, sequence length, generated tokens, adapted layers, prompt length, prefix length)
CPU_SIZES = {
    "tiny (256x4)": (lambda: llama_config(256, 4, 4, vocab=4096), 4, 128, 64, 3, 10, 16),
    "small (512x8)": (lambda: llama_config(512, 8, 8, vocab=4096), 4, 128, 64, 6, 10, 32),
    "mid (1024x12)": (lambda: llama_config(1024, 12, 16), 2, 256, 32, 10, 10, 64),
}
GPU_SIZES = {
    "7B-shaped (4096x32)": (lambda: llama_config(4096, 32, 32), 4, 512, 64, 30, 10, 128),
}


class Timer:
    """CPU time of this process on CPUs (immune to other processes), wall time after a sync on GPUs."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    def measure(self, fn: Callable[[], object]) -> float:
        start = self.now()
        fn()
        return self.now() - start


# ---------------------------------------------------------------- building the pairs


def base_model(config: LlamaConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    return build_base_model(config, device=device, dtype=dtype).requires_grad_(False)


def v1_pair(base, layers: int, length: int):
    """(ours, peft's) LLaMA-Adapter V1 on copies of the same base."""
    from peft import AdaptionPromptConfig, get_peft_model

    ours = attach_adapter(
        copy.deepcopy(base), make_config("llama-adapter-v1", prompt_length=length, adapted_layers=layers)
    )
    mark_trainable(ours)
    peft_config = AdaptionPromptConfig(adapter_len=length, adapter_layers=layers, task_type="CAUSAL_LM")
    theirs = get_peft_model(copy.deepcopy(base), peft_config)
    return ours, theirs


def prefix_pair(base, length: int):
    """(ours, peft's) deep prefix tuning on copies of the same base; dropout off in both (peft has none)."""
    from peft import PrefixTuningConfig, get_peft_model

    options = {"pre_seq_len": length, "prefix_projection": False, "prefix_dropout": 0.0}
    ours = attach_adapter(copy.deepcopy(base), make_config("ptuning-v2", **options))
    mark_trainable(ours)
    peft_config = PrefixTuningConfig(num_virtual_tokens=length, task_type="CAUSAL_LM", prefix_projection=False)
    theirs = get_peft_model(copy.deepcopy(base), peft_config)
    return ours, theirs


# ---------------------------------------------------------------- correctness


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


@torch.no_grad()
def v1_equivalence(base, layers: int, length: int, ids: torch.Tensor) -> dict[str, float]:
    """Zero-init: both equal the base exactly. Shared nonzero gate + same prompts: ours == peft."""
    ours, theirs = v1_pair(base, layers, length)
    reference = logits(base, ids)
    zero_ours = float((logits(ours, ids) - reference).abs().max())
    zero_peft = float((logits(theirs, ids) - reference).abs().max())
    assert zero_ours == 0.0, f"ours changes the base at zero-init by {zero_ours}"
    assert zero_peft == 0.0, f"peft changes the base at zero-init by {zero_peft}"

    plain = attach_adapter(
        copy.deepcopy(base),
        make_config("llama-adapter-v1", prompt_length=length, adapted_layers=layers, gate_tanh=False),
    )
    ours_layers = [m for m in plain.modules() if getattr(m, "adapter_prompt", None) is not None]
    peft_layers = [m for m in theirs.modules() if hasattr(m, "adaption_prompt")]
    assert len(ours_layers) == len(peft_layers) == layers
    for mine, other in zip(ours_layers, peft_layers, strict=True):
        other.adaption_gate.fill_(0.5)
        mine.adapter_gate.fill_(0.5)
        mine.adapter_prompt.copy_(other.adaption_prompt[0].to(mine.adapter_prompt.dtype))
    adapted = logits(theirs, ids)
    gated = float((logits(plain, ids) - adapted).abs().max())
    scale = float(adapted.abs().max())
    tolerance = 1e-4 if ids.device.type == "cpu" and reference.dtype == torch.float32 else 5e-2
    assert gated <= tolerance * max(1.0, scale), f"ours and peft differ by {gated} at a shared gate of 0.5"
    return {
        "zero_init_max_abs_diff_ours": zero_ours,
        "zero_init_max_abs_diff_peft": zero_peft,
        "gate_0.5_max_abs_diff": gated,
    }


# ---------------------------------------------------------------- speed and memory


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_step(model, optimizer, ids: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def generate(model, prompt: torch.Tensor, new_tokens: int) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

    return run


def accounted_step_memory(model, optimizer, ids: torch.Tensor) -> int:
    """Bytes at the end of a CPU train step's backward: weights, trainable grads, AdamW moments, saved tensors."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    params = trainable(model)
    grads = sum(p.numel() * p.element_size() for p in params)
    moments = 2 * sum(p.numel() * 4 for p in params)
    loss, activations = saved_for_backward(lambda: model(input_ids=ids, labels=ids).loss, model)
    loss.backward()
    optimizer.zero_grad(set_to_none=True)
    return weights + grads + moments + activations


def cuda_step_memory(step: Callable[[], None]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def compare(pair, ids, prompt, new_tokens, rounds: int, timer: Timer) -> dict[str, dict[str, float]]:
    """Train-step seconds, generation tokens/s and step memory of (ours, peft), interleaved."""
    names = ("ours", "peft")
    optimizers = {n: torch.optim.AdamW(trainable(m), lr=1e-4) for n, m in zip(names, pair, strict=True)}
    steps = {n: train_step(m, optimizers[n], ids) for n, m in zip(names, pair, strict=True)}
    gens = {n: generate(m, prompt, new_tokens) for n, m in zip(names, pair, strict=True)}
    for name in names:  # warm-up: allocator, kernels, optimizer state
        steps[name]()
        gens[name]()
    step_times: dict[str, list[float]] = {n: [] for n in names}
    gen_times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for name in names:
            step_times[name].append(timer.measure(steps[name]))
            gen_times[name].append(timer.measure(gens[name]))
    result = {}
    for name, model in zip(names, pair, strict=True):
        if timer.cuda:
            memory = cuda_step_memory(steps[name])
        else:
            memory = accounted_step_memory(model, optimizers[name], ids)
        result[name] = {
            "train_step_s": statistics.median(step_times[name]),
            "generate_tokens_per_s": prompt.shape[0] * new_tokens / statistics.median(gen_times[name]),
            "train_step_memory_mb": memory / 2**20,
            "trainable_params": sum(p.numel() for p in trainable(model)),
        }
    ours, theirs = result["ours"], result["peft"]
    result["ratio"] = {
        "train_step_time (ours/peft)": ours["train_step_s"] / theirs["train_step_s"],
        "generate_tokens_per_s (ours/peft)": ours["generate_tokens_per_s"] / theirs["generate_tokens_per_s"],
        "train_step_memory (ours/peft)": ours["train_step_memory_mb"] / theirs["train_step_memory_mb"],
    }
    return result


# ---------------------------------------------------------------- driver


def run(sizes: dict, device: torch.device, dtype: torch.dtype, rounds: int) -> dict:
    timer = Timer(device)
    rows = {}
    for name, (make, batch, length, new_tokens, layers, prompt_length, prefix_length) in sizes.items():
        config = make()
        base = base_model(config, device, dtype)
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(3, config.vocab_size, (batch, length), generator=generator).to(device)
        prompt = torch.randint(3, config.vocab_size, (1, 32), generator=generator).to(device)
        check = ids[:2, :64]
        row = {
            "config": {
                "hidden": config.hidden_size,
                "layers": config.num_hidden_layers,
                "batch": batch,
                "seq": length,
                "new_tokens": new_tokens,
                "dtype": str(dtype).removeprefix("torch."),
            }
        }
        row["v1"] = {
            "adapted_layers": layers,
            "prompt_length": prompt_length,
            **v1_equivalence(base, layers, prompt_length, check),
        }
        row["v1"].update(compare(v1_pair(base, layers, prompt_length), ids, prompt, new_tokens, rounds, timer))
        row["prefix"] = {"prefix_length": prefix_length}
        row["prefix"].update(compare(prefix_pair(base, prefix_length), ids, prompt, new_tokens, rounds, timer))
        rows[name] = row
        print_row(name, row)
    return rows


def print_row(name: str, row: dict) -> None:
    for method, label in (("v1", "LLaMA-Adapter V1 vs AdaptionPrompt"), ("prefix", "P-Tuning v2 vs PrefixTuning")):
        r = row[method]
        ratio = r["ratio"]
        print(
            f"{name:<22} {label:<36} step {r['ours']['train_step_s'] * 1e3:8.1f} / {r['peft']['train_step_s'] * 1e3:8.1f} ms"
            f" = {ratio['train_step_time (ours/peft)']:.2f}x | gen {r['ours']['generate_tokens_per_s']:7.1f} /"
            f" {r['peft']['generate_tokens_per_s']:7.1f} tok/s = {ratio['generate_tokens_per_s (ours/peft)']:.2f}x |"
            f" mem {ratio['train_step_memory (ours/peft)']:.2f}x"
            + (
                f" | zero-init Δ {r['zero_init_max_abs_diff_ours']:g}/{r['zero_init_max_abs_diff_peft']:g},"
                f" gate 0.5 Δ {r['gate_0.5_max_abs_diff']:.1e}"
                if method == "v1"
                else ""
            )
        )


def ratio_table(rows: dict) -> Table:
    """Ours / peft's, one row per size: step time, generation throughput and step memory of both method pairs."""
    table = Table(["LLaMA (width × layers)", "batch × seq", "V1 step", "V1 tokens/s", "V1 memory",
                   "P-Tuning v2 step", "P-Tuning v2 tokens/s", "P-Tuning v2 memory"])  # fmt: skip
    for name, row in rows.items():
        config = row["config"]
        cells = []
        for method in ("v1", "prefix"):
            ratio = row[method]["ratio"]
            cells += [
                f"{ratio['train_step_time (ours/peft)']:.2f}×",
                f"{ratio['generate_tokens_per_s (ours/peft)']:.2f}×",
                f"{ratio['train_step_memory (ours/peft)']:.2f}×",
            ]
        size = f"{name.split()[0]} ({config['hidden']} × {config['layers']})"
        table.add(size, f"{config['batch']} × {config['seq']}", *cells)
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the two smallest CPU sizes, fewer rounds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, help="timed rounds per variant (default 5, quick 3)")
    parser.add_argument("--out", type=Path, default=RESULTS / "peers.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rounds = args.rounds or (3 if args.quick else 5)
    if device.type == "cpu":
        torch.set_num_threads(1)
    sizes = dict(list(CPU_SIZES.items())[:2]) if args.quick else dict(CPU_SIZES)
    dtype = torch.float32
    if device.type == "cuda":
        sizes = {**sizes, **GPU_SIZES}
        dtype = torch.bfloat16
    results = {
        "benchmark": "peers",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} thread",
        "torch": torch.__version__,
        "timing": "CPU time of this process" if device.type == "cpu" else "wall time (synchronised)",
        "rounds": rounds,
        "sizes": run(sizes, device, dtype, rounds),
    }
    table = ratio_table(results["sizes"])
    print("\nours / peft's:")
    table.print()
    write_results(results, args.out, {"ratios": table})
    return results


if __name__ == "__main__":
    main()
