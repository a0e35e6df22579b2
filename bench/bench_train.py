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

The second table accounts one LLaMA-Adapter V2 instruction step (released BIAS-7B adapter: prompts, biases,
norms; the visual prompt from cached CLIP features) at the 7B shape on the meta device, on a bf16 base and on a
4-/8-bit one (bitsandbytes layout), with and without gradient checkpointing, against a 16 GB GPU.

    python bench/bench_train.py [--quick] [--out bench/results/train.json]
    python bench/bench_train.py --memory-7b [--batch 4 --seq 512]   # the second table alone (seconds)
    python bench/bench_train.py --head [--quick]   # the output head on supervised positions vs all (a minute)

`--head` compares the training loss as it runs (TokenLoss: the output head and cross-entropy only at the
positions some row is supervised at) with the same loss over every position, on an instruction batch whose
prompts are three quarters of each sequence, at LLaMA-2's and Llama 3's vocabulary sizes: step time (one
thread, CPU time, interleaved rounds) and the accounted activations of the step.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from benchlib import RESULTS, Table, saved_for_backward, write_results
from torch import nn

from mmadapter.adapters import attach_adapter, build_base_model, make_config, optimizer_param_groups
from mmadapter.adapters.backbones.presets import base_config, llama_config
from mmadapter.adapters.methods.base import mark_trainable, no_weight_decay
from mmadapter.train.loss import TokenLoss
from mmadapter.train.setup import set_gradient_checkpointing


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


METHOD_NAMES = {
    "full fine-tuning": "full fine-tuning",
    "llama-adapter-v1": "LLaMA-Adapter V1",
    "llama-adapter-v2": "LLaMA-Adapter V2",
    "lora": "LoRA r=8",
    "ptuning-v2": "P-Tuning v2",
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


# ---------------------------------------------------------------- a 7B V2 step on a quantized base, accounted

GIB = 2**30
#: A "16 GB" GPU, in bytes as its maker counts them (14.9 GiB), before the CUDA context takes its share.
GPU_16GB = 16 * 10**9


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """bitsandbytes NF4: 4 bits a value plus one absmax per block of 64 values (float32, or with double
    quantization 8 bits plus one float32 per 256 blocks)."""
    blocks = math.ceil(numel / 64)
    return numel // 2 + (blocks + 4 * math.ceil(blocks / 256) if double_quant else 4 * blocks)


def int8_bytes(linear: nn.Linear) -> int:
    """LLM.int8: one byte a value plus a float32 scale per output row."""
    return linear.weight.numel() + 4 * linear.out_features


def quantized_linears(model: nn.Module) -> list[nn.Linear]:
    """What transformers' bitsandbytes integration quantizes here: the decoder layers' linears (the output head,
    and the vision tower and projector that are attached after loading, keep their dtype)."""
    return [m for m in model.get_decoder().layers.modules() if isinstance(m, nn.Linear)]


def v2_7b_memory(batch: int, seq: int) -> dict[str, dict[str, int]]:
    """(base, checkpointing) -> accounted bytes of one V2 instruction step at the 7B shape, by part."""
    model = build_base_model(base_config("llama-7b"), device="meta", dtype=torch.bfloat16)
    attach_adapter(model, make_config("llama-adapter-v2", "multimodal-7b"))
    trainable = list(mark_trainable(model, "instruction").values())
    config = model.config
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    inputs = {
        "input_ids": ids,
        # A 4-D mask: transformers reads the values of a 2-D one, which meta tensors do not have.
        "attention_mask": torch.ones(batch, 1, seq, seq, dtype=torch.bool, device="meta"),
        # The instruction stage trains neither CLIP nor the projector: the visual prompt carries no graph.
        "adapter_visual_prompt": torch.zeros(
            batch, model.adapter_config.prompt_length, config.hidden_size, device="meta"
        ),
    }

    def loss() -> torch.Tensor:  # TokenLoss's arithmetic, every position supervised
        logits = model(**inputs).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none").sum()

    model.train()
    _, plain = saved_for_backward(loss, model)
    set_gradient_checkpointing(model, True)
    _, outside = saved_for_backward(loss, model)  # what the checkpointed layers do not hide: embedding, head, loss
    layers = config.num_hidden_layers
    hidden = batch * seq * config.hidden_size * 2  # one layer's bf16 input, kept for its replay
    # Checkpointed: the layers' inputs, plus one layer's activations while it is replayed in the backward pass.
    checkpointed = outside + layers * hidden + (plain - outside) // layers

    linears = quantized_linears(model)
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    in_linears = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    largest = max(m.weight.numel() for m in linears)
    weights = {
        "bf16": full,
        "4-bit": full - in_linears + sum(nf4_bytes(m.weight.numel()) for m in linears),
        "8-bit": full - in_linears + sum(int8_bytes(m) for m in linears),
    }
    common = {
        "gradients": sum(p.numel() * p.element_size() for p in trainable),
        "optimizer": sum(2 * p.numel() * 4 for p in trainable),
    }
    rows = {}
    for base, weight_bytes in weights.items():
        # The backward pass of a quantized linear dequantizes its weight to bf16, one layer at a time.
        dequantized = 0 if base == "bf16" else largest * 2
        for on, activations in ((False, plain), (True, checkpointed)):
            parts = {"weights": weight_bytes, **common, "activations": activations, "dequantized": dequantized}
            rows[f"{base} base, checkpointing {'on' if on else 'off'}"] = {**parts, "total": sum(parts.values())}
    return rows


def memory_7b_table(batch: int, seq: int) -> tuple[dict, Table]:
    rows = v2_7b_memory(batch, seq)
    print(f"\nLLaMA-Adapter V2 instruction step at the 7B shape, batch {batch} x {seq} tokens (accounted on meta):")
    table = Table(
        ["base", "checkpointing", "weights GiB", "activations GiB", "grads + AdamW GiB", "total GiB", "fits 16 GB"]
    )
    for name, row in rows.items():
        base, checkpointing = name.split(" base, checkpointing ")
        table.add(
            base, checkpointing, f"{row['weights'] / GIB:.2f}", f"{row['activations'] / GIB:.2f}",
            f"{(row['gradients'] + row['optimizer']) / GIB:.3f}", f"{row['total'] / GIB:.2f}",
            "yes" if row["total"] <= GPU_16GB else "no",
        )  # fmt: skip
    table.print()
    return {
        "setup": {"shape": "llama-7b", "adapter": "llama-adapter-v2 multimodal-7b, instruction stage", "batch": batch},
        "seq": seq,
        "memory_method": "accounted on the meta device: weights (bitsandbytes layout when quantized) + trainable "
        "grads + AdamW moments + saved activations (checkpointed: layer inputs + one replayed layer) + one "
        "dequantized weight; CUDA context and allocator slack not included",
        "gpu_16gb_bytes": GPU_16GB,
        "results": rows,
    }, table


def head_table(quick: bool) -> tuple[dict, Table]:
    """Supervised positions only vs every position, side by side on the same LoRA model and batch."""
    torch.set_num_threads(1)
    batch_size, seq, width, layers, rounds = (2, 128, 128, 2, 3) if quick else (2, 512, 256, 4, 5)
    prompt = seq * 3 // 4
    rows, table = {}, Table(["vocabulary", "logits at", "step s", "× all", "activations MiB", "× all"])
    for vocab in (32000, 128256):
        torch.manual_seed(0)
        base = build_base_model(llama_config(width, layers, width // 64, vocab=vocab)).requires_grad_(False)
        model, optimizer = build(base, method_configs(layers)["lora"])
        ids = torch.randint(3, vocab, (batch_size, seq))
        labels = ids.clone()
        labels[:, :prompt] = -100
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        variants = {"supervised positions": TokenLoss(model), "all positions": TokenLoss(model)}
        variants["all positions"].keeps_logits = False
        times: dict[str, list[float]] = {name: [] for name in variants}
        saved = {name: saved_for_backward(lambda m=m, b=batch: m(**b).sum(), model)[1] for name, m in variants.items()}
        optimizer.zero_grad(set_to_none=True)
        for _ in range(rounds):
            for name, loss_module in variants.items():
                times[name].append(timed_step(loss_module, optimizer, batch, "cpu"))
        for name in variants:
            step = statistics.median(times[name])
            ratio = step / statistics.median(times["all positions"])
            rows[f"{vocab} {name}"] = {"vocab": vocab, "step_s": step, "step_ratio": ratio, "activations": saved[name]}
            table.add(f"{vocab:,}", name, f"{step:.3f}", f"{ratio:.2f}", f"{saved[name] / 2**20:.1f}",
                      f"{saved[name] / saved['all positions']:.2f}")  # fmt: skip
    print(f"\nOutput head: LoRA r=8 on LLaMA {layers} x {width}, batch {batch_size} x {seq} (prompt {prompt} tokens):")
    table.print()
    setup = {"layers": layers, "width": width, "batch": batch_size, "seq": seq, "prompt_tokens": prompt}
    return {"setup": setup, "rounds": rounds, "results": rows}, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer steps (seconds)")
    parser.add_argument(
        "--out",
        type=Path,
        help="JSON (default bench/results/train.json, with --memory-7b bench/results/train_memory_7b.json)",
    )
    parser.add_argument("--memory-7b", action="store_true", help="only the accounted 7B V2 step (seconds)")
    parser.add_argument("--head", action="store_true", help="only the output head on supervised positions vs all")
    parser.add_argument("--batch", type=int, default=4, help="7B V2 step: sequences (released: 4 per GPU)")
    parser.add_argument("--seq", type=int, default=512, help="7B V2 step: tokens per sequence (released: 512)")
    args = parser.parse_args()
    if args.head:
        document, printed = head_table(args.quick)
        document = {"benchmark": "train_head", "date": date.today().isoformat(), **document}
        document["machine"] = {"platform": platform.platform(), "torch": torch.__version__, "threads": 1}
        write_results(document, args.out or RESULTS / "train_head.json", {"head": printed})
        return
    memory_7b, memory_7b_printed = memory_7b_table(args.batch, args.seq)
    if args.memory_7b:
        document = {"benchmark": "train_memory_7b", "date": date.today().isoformat(), **memory_7b}
        write_results(document, args.out or RESULTS / "train_memory_7b.json", {"memory_7b": memory_7b_printed})
        return
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
    table = Table(["method", "trainable", "step s", "× full", "memory MiB", "× full"])
    for name, row in rows.items():
        table.add(
            METHOD_NAMES[name], f"{row['trainable_params']:,}", f"{row['step_s']:.3f}", f"{row['step_ratio']:.2f}",
            f"{row['memory_bytes'] / 2**20:.1f}", f"{row['memory_ratio']:.2f}",
        )  # fmt: skip
    table.print()
    document = {
        "benchmark": "train_step",
        "date": date.today().isoformat(),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "setup": {"layers": layers, "width": width, "vocab": vocab, "batch": batch_size, "seq": seq, "device": device},
        "memory_method": "accounted: weights + trainable grads + AdamW moments + saved activations",
        "results": rows,
        "v2_7b_memory": memory_7b,
    }
    write_results(document, args.out or RESULTS / "train.json", {"step": table, "memory_7b": memory_7b_printed})


if __name__ == "__main__":
    main()
