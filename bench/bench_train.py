"""Training-step time and memory of every method against full fine-tuning, side by side in one process.

One optimizer step = forward, backward and AdamW step over the trainable set (the official weight-decay
grouping), the same per-token loss module as the training loop. Methods run in interleaved rounds and
the median step is kept; read the ratios to full fine-tuning. On a CPU the step runs on one thread and is
timed by this process's CPU time, so other processes on a shared machine do not skew it; on a GPU by
wall time after synchronising.

Memory is accounted, not sampled (CPU allocators keep freed memory, so resident-set growth is
unreliable): weights + gradients of the trainable set + AdamW's two float32 moments + the tensors
autograd saves for backward (counted once per storage while the forward runs). That is the peak of a
step, which comes at the end of the backward pass. On a GPU the CUDA allocator's own peak is also
reported (`torch.cuda.max_memory_allocated`).

    python bench/bench_train.py [--quick] [--out bench/results/train.json]
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
from benchlib import RESULTS, saved_for_backward, write_results

from mmadapter.adapters import attach_adapter, build_base_model, make_config, optimizer_param_groups
from mmadapter.adapters.backbones.presets import llama_config
from mmadapter.adapters.methods.base import mark_trainable, no_weight_decay
from mmadapter.train.loss import TokenLoss


def method_configs(layers: int) -> dict[str, tuple[str, dict] | None]:
    """Method -> (name, options) as released, scaled to `layers` (None: full fine-tuning)."""
    return {
        "full fine-tuning": None,
        "llama-adapter-v1": ("llama-adapter-v1", {"prompt_length": 10, "adapted_layers": layers - 1}),
        # Text side of the released V2: prompts in layers 1.., biases on q/o/gate/up/down, all norms.
        "llama-adapter-v2": ("llama-adapter-v2", {"visual_projector": "none", "first_adapted_layer": 1}),
        "lora": ("lora", {"r": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}),
        "ptuning-v2": ("ptuning-v2", {"pre_seq_len": 128, "prefix_dropout": 0.1}),
    }


def build(base, method: tuple[str, dict] | None):
    """(model, AdamW) with exactly the method's trainable set."""
    model = copy.deepcopy(base)
    if method is None:
        model.requires_grad_(True)
        decay = [p for n, p in model.named_parameters() if not no_weight_decay(n, p)]
        rest = [p for n, p in model.named_parameters() if no_weight_decay(n, p)]
        groups = [{"params": decay, "weight_decay": 0.02}, {"params": rest, "weight_decay": 0.0}]
    else:
        attach_adapter(model, make_config(method[0], **method[1]))
        mark_trainable(model)
        groups = optimizer_param_groups(model, 0.02)
    return model.train(), torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95))


def accounted_bytes(model, optimizer, activations: int) -> dict[str, int]:
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in trainable)
    moments = sum(2 * p.numel() * 4 for p in trainable)
    return {"weights": weights, "gradients": grads, "optimizer": moments, "activations": activations}


def timed_step(loss_module, optimizer, batch, device: str) -> float:
    """Seconds of one optimizer step: CPU time of this process on a CPU, wall time on a GPU."""
    clock = time.perf_counter if device == "cuda" else time.process_time
    start = clock()
    train_step(loss_module, optimizer, batch)
    if device == "cuda":
        torch.cuda.synchronize()
    return clock() - start


def train_step(loss_module, optimizer, batch) -> None:
    losses = loss_module(**batch)
    (losses.sum() / losses.numel()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer steps (seconds)")
    parser.add_argument("--out", type=Path, default=RESULTS / "train.json")
    args = parser.parse_args()
    layers, width, seq, batch_size, vocab, rounds = (
        (4, 256, 128, 2, 4096, 3) if args.quick else (8, 512, 256, 2, 4096, 5)
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)
    torch.manual_seed(0)
    config = llama_config(width, layers, width // 64, vocab=vocab)
    base = build_base_model(config, device=device).requires_grad_(False)
    ids = torch.randint(3, vocab, (batch_size, seq), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    methods = method_configs(layers)
    setups = {name: build(base, method) for name, method in methods.items()}
    times: dict[str, list[float]] = {name: [] for name in methods}
    memory: dict[str, dict[str, int]] = {}
    cuda_peak: dict[str, int] = {}
    for name, (model, optimizer) in setups.items():
        loss_module = TokenLoss(model)
        _, activations = saved_for_backward(lambda: loss_module(**batch).sum(), model)  # noqa: B023 (called now)
        memory[name] = accounted_bytes(model, optimizer, activations)
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        train_step(loss_module, optimizer, batch)  # warm-up; creates AdamW's state
        if device == "cuda":
            torch.cuda.synchronize()
            cuda_peak[name] = torch.cuda.max_memory_allocated()
    for _ in range(rounds):  # interleaved, so noise hits every method alike
        for name, (model, optimizer) in setups.items():
            times[name].append(timed_step(TokenLoss(model), optimizer, batch, device))

    full = "full fine-tuning"
    rows = {}
    for name, (_, optimizer) in setups.items():
        step = statistics.median(times[name])
        total = sum(memory[name].values())
        trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        rows[name] = {
            "trainable_params": trainable,
            "step_s": step,
            "step_ratio": step / statistics.median(times[full]),
            "memory_bytes": total,
            "memory_ratio": total / sum(memory[full].values()),
            "memory_parts": memory[name],
            **({"cuda_peak_bytes": cuda_peak[name]} if name in cuda_peak else {}),
        }

    title = (
        f"LLaMA {layers} layers x {width} (vocab {vocab}), batch {batch_size} x {seq} tokens, "
        f"{device}, fp32, median of {rounds} steps" + (" (1 thread, CPU time)" if device == "cpu" else "")
    )
    print(title)
    print(f"{'method':<18} {'trainable':>11} {'step s':>8} {'ratio':>6} {'memory MiB':>11} {'ratio':>6}")
    for name, row in rows.items():
        print(
            f"{name:<18} {row['trainable_params']:>11,} {row['step_s']:>8.3f} {row['step_ratio']:>6.2f} "
            f"{row['memory_bytes'] / 2**20:>11.1f} {row['memory_ratio']:>6.2f}"
        )
    document = {
        "benchmark": "train_step",
        "date": date.today().isoformat(),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "setup": {"layers": layers, "width": width, "vocab": vocab, "batch": batch_size, "seq": seq, "device": device},
        "memory_method": "accounted: weights + trainable grads + AdamW moments + saved activations",
        "results": rows,
    }
    write_results(document, args.out)


if __name__ == "__main__":
    main()
