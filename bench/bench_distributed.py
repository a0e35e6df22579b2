"""One process vs 2-process DDP vs 2-process FSDP2 (CPU, gloo, one thread per process): optimizer-step time and
what each process holds of the trainable state.

Each setup is its own torchrun launch of this file (`--worker`), training the same LoRA adapter (r 8 on q/v)
on the same base with the same global batch through mmadapter's own code path (train.setup's accelerator,
train.sharding's FSDP2). Step = forward + backward + AdamW step over the global batch; the median of the
timed steps (wall time, every process waiting for the slowest) is kept. Per-process trainable state is
accounted from the tensors each process holds after a step: adapter weights + their gradients + AdamW's
two moments (local shards under FSDP2); the frozen base weights each process holds are shown beside it.

The second table accounts what each of 8 GPUs holds at the 7B/13B/65B shapes (meta device; parameter counts
from `parameter_report`, what `mmadapter info` prints), for the same LoRA adapter on a bf16 base: the
frozen base, plus the trainable state (float32 weights, gradients and AdamW moments: 16 bytes a parameter),
whole under DDP and 1/8 under FSDP2 and ZeRO-3, plus what FSDP2 gathers at a time (two decoder layers:
the running one and the prefetched one, and the head, kept from forward to backward). Activations depend
on batch and sequence and are not included (bench_train.py --memory-7b accounts those of one step).

    python bench/bench_distributed.py [--quick] [--out bench/results/distributed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from benchlib import RESULTS, Table, write_results

#: What `accelerate launch` puts in the environment for assets/accelerate/fsdp2-8gpu-65b.yaml.
FSDP2_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
    "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
}
#: Setup name -> (processes, extra environment).
SETUPS = {"1 process": (1, {}), "2-process DDP": (2, {}), "2-process FSDP2": (2, FSDP2_ENV)}
SHAPE = {"layers": 8, "width": 512, "vocab": 4096, "global_batch": 4, "seq": 128}
LORA = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
GIB = 2**30


# ---------------------------------------------------------------- inside one launch (every process)


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this process holds of a tensor (its shard, for a DTensor)."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def worker(steps: int, out: Path) -> None:
    """Train `steps` steps in this process of the launch; the main process writes every process's figures."""
    from mmadapter.adapters import attach_adapter, build_base_model, make_config, optimizer_param_groups
    from mmadapter.adapters.backbones.presets import llama_config
    from mmadapter.adapters.methods.base import trainable_parameters
    from mmadapter.train.loss import TokenLoss
    from mmadapter.train.setup import plain_accelerator, select_trainable
    from mmadapter.train.sharding import enable_fsdp2, is_fsdp2, shard_loss_module

    torch.set_num_threads(1)
    accelerator = plain_accelerator("no")
    enable_fsdp2(accelerator)
    torch.manual_seed(0)
    model = build_base_model(
        llama_config(SHAPE["width"], SHAPE["layers"], 8, ffn=4 * SHAPE["width"], vocab=SHAPE["vocab"])
    )
    attach_adapter(model, make_config("lora", None, **LORA))
    select_trainable(model, [None])
    loss_module = TokenLoss(model)
    if is_fsdp2(accelerator):
        loss_module = shard_loss_module(accelerator, loss_module)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, 0.0, None), lr=1e-4)
    if not is_fsdp2(accelerator):
        loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    params = list(trainable_parameters(model, None).values())

    batch = SHAPE["global_batch"] // accelerator.num_processes
    generator = torch.Generator().manual_seed(accelerator.process_index)
    ids = torch.randint(0, SHAPE["vocab"], (batch, SHAPE["seq"]), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    times = []
    for step in range(steps + 2):  # two warm-up steps
        accelerator.wait_for_everyone()
        started = time.perf_counter()
        losses = loss_module(**inputs)
        accelerator.backward(losses.mean())
        optimizer.step()
        accelerator.wait_for_everyone()
        if step >= 2:
            times.append(time.perf_counter() - started)
        if step < steps + 1:
            optimizer.zero_grad(set_to_none=True)

    trainable = {id(p) for p in params}
    state = [t for p in params for t in optimizer.state[p].values() if torch.is_tensor(t) and t.dim() > 0]
    figures = torch.tensor(
        [
            sum(local_bytes(p) for p in params),
            sum(local_bytes(p.grad) for p in params if p.grad is not None),
            sum(local_bytes(t) for t in state),
            sum(local_bytes(p) for p in model.parameters() if id(p) not in trainable),
            statistics.median(times),
        ],
        dtype=torch.float64,
    )
    every = accelerator.gather(figures[None]) if accelerator.num_processes > 1 else figures[None]
    if accelerator.is_main_process:
        keys = ("weights", "gradients", "adamw_moments", "frozen_weights", "step_s")
        out.write_text(json.dumps([dict(zip(keys, row.tolist(), strict=True)) for row in every]))
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------- the launches and the table


def measure(processes: int, env: dict[str, str], steps: int) -> list[dict[str, float]]:
    """One launch of `processes` processes; every process's figures."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "figures.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        command += [__file__, "--worker", "--steps", str(steps), "--worker-out", str(out)]
        repo = Path(__file__).resolve().parents[1]
        environment = {**os.environ, **env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
        subprocess.run(command, env=environment, check=True, capture_output=True, text=True)
        return json.loads(out.read_text())


def distributed_table(steps: int) -> tuple[dict, Table]:
    """Step time and per-process trainable state of every setup, with ratios to DDP."""
    results = {name: measure(processes, env, steps) for name, (processes, env) in SETUPS.items()}
    table = Table(
        [
            "setup",
            "step (s)",
            "step vs DDP",
            "trainable state / process (KiB)",
            "AdamW moments / process (KiB)",
            "moments vs DDP",
            "frozen base / process (MiB)",
        ]
    )
    ddp = results["2-process DDP"][0]
    summary = {}
    for name, ranks in results.items():
        worst = max(ranks, key=lambda r: r["weights"] + r["gradients"] + r["adamw_moments"])
        state = worst["weights"] + worst["gradients"] + worst["adamw_moments"]
        step = max(r["step_s"] for r in ranks)
        summary[name] = {"per_process": ranks, "trainable_state_bytes": state, "step_s": step}
        table.add(
            name,
            f"{step:.3f}",
            f"{step / ddp['step_s']:.2f}x",
            f"{state / 1024:.0f}",
            f"{worst['adamw_moments'] / 1024:.0f}",
            f"{worst['adamw_moments'] / ddp['adamw_moments']:.2f}x",
            f"{worst['frozen_weights'] / 2**20:.1f}",
        )
    return summary, table


def memory_at_scale_table(gpus: int = 8) -> tuple[dict, Table]:
    """Accounted bytes per GPU at the 7B/13B/65B shapes under DDP and under FSDP2 / ZeRO-3 over `gpus` GPUs."""
    from mmadapter.adapters import attach_adapter, build_base_model, make_config
    from mmadapter.adapters.backbones.presets import base_config
    from mmadapter.adapters.methods.report import parameter_report

    table = Table(["base", "parameters", "trainable", "DDP GiB / GPU", f"FSDP2 / ZeRO-3 GiB / GPU ({gpus} GPUs)"])
    results = {}
    for base in ("llama-7b", "llama-13b", "llama-65b"):
        model = build_base_model(base_config(base), device="meta", dtype=torch.bfloat16)
        attach_adapter(model, make_config("lora", None, **LORA))
        report = parameter_report(model, None)
        trainable = report["trainable_params"]
        frozen = 2 * (report["total_params"] - trainable)  # bf16
        state = 16 * trainable  # float32 weights, gradients, two AdamW moments
        layer = sum(p.numel() for p in model.get_decoder().layers[0].parameters()) * 2
        head = model.get_output_embeddings().weight.numel() * 2
        ddp = frozen + state
        sharded = (frozen + state) / gpus + 2 * layer + head
        results[base] = {"total_params": report["total_params"], "trainable_params": trainable, "ddp_bytes": ddp}
        results[base]["sharded_bytes"] = sharded
        table.add(
            base,
            f"{report['total_params'] / 1e9:.1f}B",
            f"{trainable / 1e6:.1f}M",
            f"{ddp / GIB:.1f}",
            f"{sharded / GIB:.1f}",
        )
    return results, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 timed steps instead of 10")
    parser.add_argument("--out", type=Path, default=RESULTS / "distributed.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.worker_out)
        return
    summary, table = distributed_table(3 if args.quick else 10)
    table.print()
    at_scale, scale_table = memory_at_scale_table()
    print("\nWeights + trainable state per GPU, LoRA r8 q/v on a bf16 base (accounted on meta; no activations):")
    scale_table.print()
    document = {
        "benchmark": "distributed",
        "date": date.today().isoformat(),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads_per_process": 1},
        "setup": {**SHAPE, "adapter": "lora r8 q_proj,v_proj", "device": "cpu", "backend": "gloo"},
        "memory_method": "accounted: tensors each process holds (local shards under FSDP2)",
        "results": summary,
        "memory_at_scale": at_scale,
    }
    write_results(document, args.out, {"distributed": table, "memory-at-scale": scale_table})


if __name__ == "__main__":
    main()
