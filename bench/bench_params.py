"""Trainable-parameter counts of every method and preset at LLaMA 7B/13B/33B/65B, Llama 3.1 8B/70B, Mistral 7B,
Qwen2.5-7B, Qwen3-8B and ChatGLM-6B, next to the papers'.

Counted the way `mmadapter info` counts (`mmadapter.adapters.methods.report.parameter_report` on a model built on
the meta device: no weights, no memory), so a 65B row takes a second. Rows whose method and base do not
fit (LLaMA-Adapter on ChatGLM, a ChatGLM LoRA preset on LLaMA) are listed as skipped. Published figures
(spec llama-adapter.md §5, §8; chatglm-6b-ptuning-v2.md): V1 1.2M (1,229,760 exactly) at 7B; V2 "14M" =
the 65B bias+scale+norm set (13,811,712); V2 multimodal BIAS-7B 61,731,584 (caption) + 1,363,968
(instruction) = 63,095,552; P-Tuning v2 on ChatGLM-6B, 128 prefix tokens, 29,360,128; LoRA r=8 on
ChatGLM-6B's query_key_value 3,670,016.

    python bench/bench_params.py [--quick] [--out bench/results/params.json]
"""

from __future__ import annotations

import argparse
import time
from datetime import date
from pathlib import Path

from benchlib import RESULTS, Table, write_results

BASES = (
    "llama-7b",
    "llama-13b",
    "llama-33b",
    "llama-65b",
    "llama3-8b",
    "llama3-70b",
    "mistral-7b",
    "qwen2.5-7b",
    "qwen3-8b",
    "chatglm-6b",
)
#: (base, method, preset, stage) -> the published count.
PAPER = {
    ("llama-7b", "llama-adapter-v1", "alpaca", None): (1_229_760, "V1 paper / README: 1.2M"),
    ("llama-65b", "llama-adapter-v2", "chat65b", None): (13_811_712, "V2 paper: 14M (65B chatbot)"),
    ("llama-7b", "llama-adapter-v2", "chat65b", None): (2_764_800, "V2 bias+scale+norm at 7B (spec §5.2)"),
    ("llama-13b", "llama-adapter-v2", "chat65b", None): (4_326_400, "V2 bias+scale+norm at 13B (spec §5.2)"),
    # The released code also creates (and saves) a gate for layer 0, which has no prompt: 32 more values.
    ("llama-7b", "llama-adapter-v2", "multimodal-7b", "caption"): (61_731_584, "released BIAS-7B, pretrain phase"),
    ("llama-7b", "llama-adapter-v2", "multimodal-7b", "instruction"): (1_363_968, "released BIAS-7B, finetune"),
    ("llama-7b", "llama-adapter-v2", "multimodal-7b", None): (63_095_552, "released BIAS-7B checkpoint"),
    ("chatglm-6b", "ptuning-v2", "adgen", None): (29_360_128, "ChatGLM-6B P-Tuning v2, PRE_SEQ_LEN 128"),
    ("chatglm-6b", "lora", "chatglm-qkv", None): (3_670_016, "LoRA r=8 on query_key_value"),
}

METHOD_NAMES = {"llama-adapter-v1": "V1", "llama-adapter-v2": "V2", "lora": "LoRA", "ptuning-v2": "P-Tuning v2"}


def variants() -> list[tuple[str, str | None]]:
    """(method, preset) pairs: every method's defaults and every preset it ships."""
    from mmadapter.adapters.methods.base import available_methods, get_method

    pairs = []
    for method in available_methods():
        pairs.append((method, None))
        pairs += [(method, preset) for preset in sorted(get_method(method).presets)]
    return pairs


def count(base: str, method: str, preset: str | None) -> list[dict]:
    """Rows for one (base, method, preset): one per training stage (plus the saved total) for staged methods."""
    from mmadapter.adapters.backbones.presets import base_config, build_base_model
    from mmadapter.adapters.methods.base import attach_adapter, get_method, make_config
    from mmadapter.adapters.methods.report import parameter_report

    model = build_base_model(base_config(base), device="meta")
    attach_adapter(model, make_config(method, preset))
    rows = []
    for stage in (*get_method(method).stages, None):
        report = parameter_report(model, stage)
        paper = PAPER.get((base, method, preset, stage))
        rows.append(
            {
                "base": base,
                "method": method,
                "preset": preset or "(defaults)",
                "stage": stage or ("all (saved)" if get_method(method).stages else "-"),
                "total_params": report["total_params"],
                "trainable_params": report["trainable_params"],
                "trainable_percent": 100 * report["trainable_fraction"],
                "paper": paper[0] if paper else None,
                "paper_source": paper[1] if paper else None,
                "matches_paper": None if paper is None else paper[0] == report["trainable_params"],
            }
        )
    return rows


def pivot(rows: list[dict], bases: dict[str, str]) -> Table:
    """Trainable counts per preset with one column per base (`–` where the method does not fit it) and the
    published figure; a method's defaults equal one of its presets and are left out."""
    counts: dict[tuple[str, str, str], dict[str, str]] = {}
    published: dict[tuple[str, str, str], list[str]] = {}
    for row in rows:
        if row["base"] not in bases or row["preset"] == "(defaults)":
            continue
        key = (row["method"], row["preset"], row["stage"])
        counts.setdefault(key, {})[row["base"]] = f"{row['trainable_params']:,}"
        if row["paper"] is not None:
            verdict = "✓" if row["matches_paper"] else f"(published {row['paper']:,})"
            published.setdefault(key, []).append(f"{bases[row['base']]} {verdict}")
    table = Table(["method", "preset", "stage", *bases.values(), "published"])
    for (method, preset, stage), by_base in counts.items():
        cells = [by_base.get(base, "–") for base in bases]
        table.add(
            METHOD_NAMES[method], f"`{preset}`", stage, *cells, ", ".join(published.get((method, preset, stage), []))
        )
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="7B and ChatGLM-6B only")
    parser.add_argument("--out", type=Path, default=RESULTS / "params.json")
    args = parser.parse_args(argv)
    bases = ("llama-7b", "chatglm-6b") if args.quick else BASES
    started = time.perf_counter()
    rows, skipped = [], []
    for base in bases:
        for method, preset in variants():
            try:
                rows += count(base, method, preset)
            except (ValueError, KeyError, AttributeError, TypeError) as error:
                skipped.append({"base": base, "method": method, "preset": preset, "reason": str(error)[:160]})
    print(f"{'base':<11} {'method':<17} {'preset':<17} {'stage':<12} {'trainable':>14} {'%':>9} {'paper':>12}")
    for row in rows:
        paper = "" if row["paper"] is None else f"{row['paper']:,}" + (" ✓" if row["matches_paper"] else " ✗")
        print(
            f"{row['base']:<11} {row['method']:<17} {row['preset']:<17} {row['stage']:<12} "
            f"{row['trainable_params']:>14,} {row['trainable_percent']:>8.4f}% {paper:>12}"
        )
    print(f"skipped {len(skipped)} combinations that do not fit their base (see the JSON for why)")
    tables = {
        "llama": pivot(rows, {"llama-7b": "7B", "llama-13b": "13B", "llama-33b": "33B", "llama-65b": "65B",
                              "chatglm-6b": "ChatGLM-6B"}),
        "today": pivot(rows, {"llama3-8b": "Llama 3.1 8B", "llama3-70b": "Llama 3.1 70B", "mistral-7b": "Mistral 7B",
                              "qwen2.5-7b": "Qwen2.5-7B", "qwen3-8b": "Qwen3-8B"}),
    }  # fmt: skip
    for table in tables.values():
        print()
        table.print()
    mismatches = [r for r in rows if r["matches_paper"] is False]
    results = {
        "benchmark": "params",
        "date": date.today().isoformat(),
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
        "skipped": skipped,
        "paper_figures_checked": sum(r["paper"] is not None for r in rows),
        "paper_mismatches": len(mismatches),
    }
    write_results(results, args.out, tables)
    return results


if __name__ == "__main__":
    main()
