"""The benchmark's report: from the records ``scripts/benchmark.py`` measured to the target ratios, the
Markdown tables (``results.md``) and the bar chart (``results.png``).

Pure over what it is handed, the result record ``benchmark.py`` assembles: ``machine``, ``settings``,
``shapes``, ``results`` (size -> configuration -> record merged over rounds, with ``<key>_rounds`` lists),
``summary`` (size -> :func:`summarise`) and ``paired``. It measures nothing and does not import the benchmark;
the targets each ratio is held to live here, beside the tables that show them.

    python scripts/benchmark.py --quick    # measures, then writes results.{md,png} with this module
"""

from __future__ import annotations

import statistics
from pathlib import Path

# how the report counts FLOPs and MFU (benchmark.flops_per_token computes them; results.json keeps the note)
FLOPS_NOTE = (
    "Model FLOPs per token, no causal discount: N = weights used in matmuls (blocks + LM head), "
    "attention 4 L T d forward (QK^T and AV). Full fine-tuning 6N + 12 L T d; LoRA with a frozen base "
    "4N + 12 L T d + 6 N_lora (no weight gradients for the base); inference 2N + 4 L T d (+ 2 N_lora "
    "unmerged). MFU = FLOPs per token x tokens/s / the GPU's dense bf16 peak."
)


def within_round_ratios(num: dict, den: dict, key: str) -> list[float]:
    """``num[key] / den[key]`` for each round both configurations completed (``[]`` if either failed)."""
    if num.get("status") != "ok" or den.get("status") != "ok":
        return []
    pairs = zip(num[f"{key}_rounds"], den[f"{key}_rounds"], strict=False)  # a round may still be running
    return [a / b for a, b in pairs if a is not None and b is not None]


def summarise(rows: dict[str, dict], paired: dict | None = None) -> dict:
    """The target ratios for one size (``None`` where a configuration did not run).

    Each ratio is the median over rounds of the ratio *within* a round: the two configurations of a round
    ran minutes apart, so a slow drift in the machine's speed (other tenants, clock changes) cancels,
    where a ratio of two medians would carry it. ``<key>_rounds`` lists the per-round ratios. With
    ``benchmark.paired_times``' record, a time ratio is also taken within each pass of the steps side by side:
    ``<key>_paired`` (median) and ``<key>_paired_range`` (lowest, highest).
    """

    pairs = {  # summary key -> (numerator config, denominator config, measured key); tokens/s = 1 / step
        "lora_qv_step_vs_full": ("lora_qv", "full", "step_ms"),
        "lora_qkvo_step_vs_full": ("lora_qkvo", "full", "step_ms"),
        "lora_qv_tokens_vs_peft": ("peft_qv", "lora_qv", "step_ms"),
        "merged_vs_base_latency": ("infer_lora_merged", "infer_base", "step_ms"),
        "unmerged_vs_base_latency": ("infer_lora_unmerged", "infer_base", "step_ms"),
        "unmerged_qkvo_vs_base_latency": ("infer_lora_qkvo_unmerged", "infer_base", "step_ms"),
        "lora_qv_fused_vs_unfused": ("lora_qv", "lora_qv_unfused", "step_ms"),
        "unmerged_qkvo_fused_vs_unfused": (
            "infer_lora_qkvo_unmerged",
            "infer_lora_qkvo_unmerged_unfused",
            "step_ms",
        ),
        "lora_qv_mem_vs_full": ("lora_qv", "full", "peak_mem_mb"),
        "dora_step_vs_lora": ("lora_qv_dora", "lora_qv", "step_ms"),
        "sync_free_vs_sync": ("lora_qv", "lora_qv_sync", "step_ms"),
        "chunked_vs_full_loss": ("lora_qv_chunked", "lora_qv", "step_ms"),
        "chunked_vs_full_loss_mem": ("lora_qv_chunked", "lora_qv", "train_peak_mem_mb"),
        "bf16_base_step_vs_fp32": ("lora_qv_bf16", "lora_qv", "step_ms"),
        "bf16_base_mem_vs_fp32": ("lora_qv_bf16", "lora_qv", "train_peak_mem_mb"),
        "bf16_base_tensor_mem_vs_fp32": ("lora_qv_bf16", "lora_qv", "train_tensor_peak_mb"),
        "nf4_train_mem_vs_fp32": ("lora_qv_nf4", "lora_qv", "train_peak_mem_mb"),
        "nf4_mem_vs_fp32": ("lora_qv_nf4", "lora_qv", "peak_mem_mb"),
        "nf4_tensor_mem_vs_fp32": ("lora_qv_nf4", "lora_qv", "train_tensor_peak_mb"),
        "nf4_ckpt_train_mem_vs_fp32": ("lora_qv_nf4_ckpt", "lora_qv_ckpt", "train_peak_mem_mb"),
        "nf4_ckpt_tensor_mem_vs_fp32": ("lora_qv_nf4_ckpt", "lora_qv_ckpt", "train_tensor_peak_mb"),
        "generate_tokens_vs_hf": ("hf_generate", "generate", "step_ms"),  # tokens/s: ours over transformers'
        # tokens/s of one mixed batch of 4 adapters over one adapter at a time
        "multi_adapter_vs_separate": ("multi_adapter_separate", "multi_adapter", "step_ms"),
    }
    out: dict = {}
    for name, config in (("lora_qv_mfu", "lora_qv"), ("full_mfu", "full")):  # values, not ratios
        row = rows.get(config, {})
        done = [v for v in row.get("mfu_rounds", []) if v is not None] if row.get("status") == "ok" else []
        out[name], out[f"{name}_rounds"] = (row["mfu"] if done else None), done
    for name, (a, b, key) in pairs.items():
        ratios = within_round_ratios(rows.get(a, {}), rows.get(b, {}), key)
        out[name] = statistics.median(ratios) if ratios else None
        out[f"{name}_rounds"] = [round(r, 4) for r in ratios]
        if key == "step_ms" and paired and a in paired and b in paired:
            within = [x / y for x, y in zip(paired[a]["ms_passes"], paired[b]["ms_passes"], strict=True)]
            out[f"{name}_paired"] = statistics.median(within)
            out[f"{name}_paired_range"] = [round(min(within), 4), round(max(within), 4)]
    ours, hf = rows.get("generate", {}), rows.get("hf_generate", {})
    both = ours.get("status") == hf.get("status") == "ok" and "generated" in ours and "generated" in hf
    out["generate_same_tokens"] = ours["generated"] == hf["generated"] if both else None
    mixed, alone = rows.get("multi_adapter", {}), rows.get("multi_adapter_separate", {})
    both = all(r.get("status") == "ok" and "generated" in r for r in (mixed, alone))
    out["multi_adapter_same_tokens"] = mixed["generated"] == alone["generated"] if both else None
    return out


# (summary key, label, "max" or "min", CPU limit, GPU limit): the GPU-speed issue's targets, the CPU ones for
# the small shape and the GPU ones for GPT-2 small's at sequence 1,024, batch 8 and 16, bf16 (None: no target)
SPEED_TARGETS = (
    ("lora_qv_step_vs_full", "LoRA q+v training step time / full fine-tuning", "max", 0.72, 0.75),
    ("lora_qv_tokens_vs_peft", "LoRA q+v tokens/s / transformers + PEFT", "min", 1.15, 1.3),
    ("lora_qv_mfu", "LoRA q+v model FLOPs utilisation", "min", None, 0.40),
    ("full_mfu", "full fine-tuning model FLOPs utilisation", "min", None, 0.45),
    ("merged_vs_base_latency", "merged inference time / base", "max", 1.02, 1.02),
    ("unmerged_vs_base_latency", "unmerged inference time / base", "max", 1.05, 1.10),
    ("unmerged_qkvo_vs_base_latency", "unmerged inference time, q+k+v+o adapted / base", "max", 1.05, None),
    ("lora_qv_mem_vs_full", "LoRA q+v peak memory / full fine-tuning", "max", 1.0, 0.6),
)


def multi_adapter_lines(rows: dict, summary: dict) -> list[str]:
    """One size's multi-adapter generation: one mixed batch against one adapter at a time (else no lines)."""
    mixed, alone = rows.get("multi_adapter", {}), rows.get("multi_adapter_separate", {})
    if mixed.get("status") != "ok" or alone.get("status") != "ok":
        return []
    same = {True: "yes", False: "no", None: "-"}[summary.get("multi_adapter_same_tokens")]
    key = "multi_adapter_vs_separate"
    ratio, rounds = summary.get(key), summary.get(f"{key}_rounds", [])
    spread = f" (rounds {min(rounds):.2f}-{max(rounds):.2f})" if len(rounds) > 1 else ""
    shown = "-" if ratio is None else f"{ratio:.2f}x{spread}"
    side = summary.get(f"{key}_paired")
    if side is not None:
        low, high = summary[f"{key}_paired_range"]
        shown += f", side by side {side:.2f}x (passes {low:.2f}-{high:.2f})"
    return ["", "Several adapters of one base, 4 prompts of 4 random adapters (q, k, v, o) answered greedily: one "
            f"mixed batch (`generate(adapter_names=...)`) {mixed['tokens_per_s']:,.1f} tokens/s, one adapter at a "
            f"time {alone['tokens_per_s']:,.1f} tokens/s; mixed over separate: {shown}; the same tokens: {same}."]  # fmt: skip


def generation_lines(rows: dict, summary: dict) -> list[str]:
    """One size's greedy generation with the key/value cache, ours against transformers', then
    :func:`multi_adapter_lines` (each only when both of its configurations ran)."""
    ours, hf = rows.get("generate", {}), rows.get("hf_generate", {})
    if ours.get("status") != "ok" or hf.get("status") != "ok":
        return multi_adapter_lines(rows, summary)
    same = {True: "yes", False: "no", None: "-"}[summary.get("generate_same_tokens")]
    ratio, rounds = summary.get("generate_tokens_vs_hf"), summary.get("generate_tokens_vs_hf_rounds", [])
    spread = f" (rounds {min(rounds):.3f}-{max(rounds):.3f})" if len(rounds) > 1 else ""
    shown = "-" if ratio is None else f"{ratio:.3f}{spread}"
    side = summary.get("generate_tokens_vs_hf_paired")
    if side is not None:  # (--paired: within passes of the two side by side in one process)
        low, high = summary["generate_tokens_vs_hf_paired_range"]
        shown += f", side by side {side:.3f} (passes {low:.3f}-{high:.3f})"
    return ["", f"Greedy generation with the key/value cache, {len(ours.get('generated', []))} new tokens of "
            "one sequence: ours (`model.generate`) "
            f"{ours['tokens_per_s']:,.1f} tokens/s, transformers' `generate(do_sample=False)` "
            f"{hf['tokens_per_s']:,.1f} tokens/s; ours over transformers' (within rounds): {shown}; "
            f"the same tokens: {same}.", *multi_adapter_lines(rows, summary)]  # fmt: skip


COMPILED_PEFT_LIMIT = (
    1.1  # on the GPU, both compiled alike: LoRA q+v at least this many times PEFT's tokens/s
)
VARIANT_TARGETS = (  # the variants issue's (measured on a CPU; elsewhere a guide)
    ("dora_step_vs_lora", "DoRA q+v training step time / LoRA q+v", 1.25, "max"),  # the variants issue's
    ("nf4_train_mem_vs_fp32", "LoRA q+v peak memory of the steps, nf4 base / fp32 base", 0.45, "max"),
    ("nf4_tensor_mem_vs_fp32", "LoRA q+v peak tensor memory of a step, nf4 base / fp32 base", 0.45, "max"),
    ("nf4_ckpt_train_mem_vs_fp32", "the same, checkpointed: peak memory of the steps", 0.45, "max"),
    ("nf4_ckpt_tensor_mem_vs_fp32", "the same, checkpointed: peak tensor memory of a step", 0.45, "max"),
)


LEVERS = (  # (lever, step-time ratio, steps' peak memory ratio): LoRA q+v with the lever over without it
    ("fused q/k/v: one product for q, k and v, one for the A's", "lora_qv_fused_vs_unfused", None),
    (
        "frozen base stored in bf16, cast to nothing per step",
        "bf16_base_step_vs_fp32",
        "bf16_base_mem_vs_fp32",
    ),
    ("no read of the loss in the step (the trainer reads every log_every)", "sync_free_vs_sync", None),
    ("LM head and loss a chunk of tokens at a time", "chunked_vs_full_loss", "chunked_vs_full_loss_mem"),
)


def lever_lines(summary: dict) -> list[str]:
    """The levers table of one size, for the levers whose two configurations both ran (else no lines)."""
    rows = []
    for lever, step, mem in LEVERS:
        if summary.get(step) is None:
            continue
        low, high = summary.get(f"{step}_paired_range") or (None, None)
        side = (
            "-"
            if summary.get(f"{step}_paired") is None
            else f"{summary[f'{step}_paired']:.3f} ({low:.3f}-{high:.3f})"
        )
        memory = "-" if mem is None or summary.get(mem) is None else f"{summary[mem]:.3f}"
        rows.append(f"| {lever} | {summary[step]:.3f} | {side} | {memory} |")
    if not rows:
        return []
    return ["", "What each lever buys: LoRA q+v with it over without it (below 1: it helps).", "",
            "| lever | step time | side by side (passes min-max) | steps' peak memory |",
            "|---|---:|---:|---:|", *rows]  # fmt: skip


def targets_for(settings: dict) -> tuple[list, tuple[str, ...]]:
    """The targets a run is held to, ``[(key, label, limit, kind)]`` by its device and compilation (the variants'
    after the speed ones), and the shapes they are set for."""
    if settings["device"] != "cuda":
        cpu_rows = [(k, label, cpu, kind) for k, label, kind, cpu, _ in SPEED_TARGETS if cpu]
        return cpu_rows + list(VARIANT_TARGETS), ("small", "smollm2")
    compiled = settings["compile"]
    graphs = compiled and settings.get("compile_mode") == "reduce-overhead"
    rows = []
    for key, label, kind, _, gpu in SPEED_TARGETS:
        if key == "lora_qv_tokens_vs_peft":  # eager, as PEFT's users run it; or both compiled alike
            label, gpu = (
                (f"{label}, both compiled", COMPILED_PEFT_LIMIT) if compiled else (f"{label}, eager", gpu)
            )
        elif graphs:
            continue
        if gpu:
            rows.append((key, label, gpu, kind))
    if graphs:  # at the launch-bound shapes, with CUDA graphs: LoRA no slower than full fine-tuning
        step = ("lora_qv_step_vs_full", "LoRA q+v training step time / full fine-tuning, with CUDA graphs", 1.0,
                "max")  # fmt: skip
        return [step, *rows], ("small", "tiny")
    return rows + list(VARIANT_TARGETS), ("gpt2_1024x8", "gpt2_1024x16")


def compiled_label(settings: dict) -> str:
    """``", compiled"`` (and its mode, where not the default) for a compiled run's title, else ``""``."""
    if not settings["compile"]:
        return ""
    mode = settings.get("compile_mode", "default")
    return ", compiled" + ("" if mode == "default" else f" ({mode})")


def family_label(shape: dict) -> str:
    """A size's heading's end: the Llama layout's fields (``family`` "llama") and whose weights it has."""
    weights = "" if shape.get("base") else "; random weights"
    if shape.get("family", "gpt2") != "llama":
        return f" (GPT-2 layout{weights})"
    kv = shape.get("num_kv_heads") or shape["num_heads"]
    return (f" (Llama layout: RMSNorm, rotary, gated SiLU MLP {shape['d_ff']:,}, {kv} key/value heads, "
            f"tied head{weights})")  # fmt: skip


def markdown(result: dict) -> str:
    """The Markdown report: one table per size, the targets, the machine."""
    m, s = result["machine"], result["settings"]
    cuda = s["device"] == "cuda"
    mem = "peak allocated (MiB)" if cuda else "peak RSS (MiB)"
    device_col = "device (ms) (kernels' ms)"
    count_col = "kernel launches" if cuda else "operators dispatched"
    rounds = f", median over {s['rounds']} rounds" if s["rounds"] > 1 else ""
    load = [f"{la[0]:.2f}" if la else "?" for la in (m["load_average_start"], m["load_average_end"])]
    lines = [
        f"# Benchmark: {s['device']}, {s['dtype']}{compiled_label(s)}",
        "",
        f"Machine: {m['gpu'] or m['cpu']} ({m['cpu_count']} CPUs), torch threads: {s['threads_used']}; "
        f"torch {m['torch']}; transformers {m['transformers']}, peft {m['peft']}; load average "
        f"{load[0]} at the start, {load[1]} at the end.",
        f"Median of {s['steps']} steps after {s['warmup']} warm-up, each configuration in a fresh "
        f"process{rounds}.",
    ]
    for size, rows in result["results"].items():
        sh = result["shapes"][size]
        lines += [
            "",
            f"## {size}: d_model {sh['d_model']}, {sh['num_layers']} layers, {sh['num_heads']} heads, "
            f"vocab {sh['vocab_size']}, batch {sh['batch']} x seq {sh['seq_len']}{family_label(sh)}",
            "",
            f"| configuration | step (ms) | {device_col} | tokens/s | vs full | {mem} | steps' peak (MiB) "
            f"| a step's tensors (MiB) | {count_col} | trainable params | MFU |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        full = rows.get("full", {})
        for name, r in rows.items():
            if r["status"] != "ok":
                lines.append(f"| {name} | {r['status']}: {r['reason']} | | | | | | | | | |")
                continue
            ratios = within_round_ratios(r, full, "step_ms") if r["trainable_params"] else []
            vs = f"{statistics.median(ratios):.2f}x" if ratios else ""  # within rounds, as the targets
            mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "-"
            tensors = f"{r['train_tensor_peak_mb']:,.0f}" if r.get("train_tensor_peak_mb") else "-"
            device_ms = (f"{r['device_ms']:.1f} ({r['kernel_ms']:.1f})" if r.get("device_ms") is not None
                         and r.get("kernel_ms") is not None else "-")  # fmt: skip
            count = r.get("kernels_per_step" if cuda else "ops_per_step")
            lines.append(
                f"| {name} | {r['step_ms']:.1f} | {device_ms} | {r['tokens_per_s']:,.0f} | {vs} "
                f"| {r['peak_mem_mb']:,.0f} | {r.get('train_peak_mem_mb') or 0:,.0f} | {tensors} "
                f"| {'-' if count is None else f'{count:,}'} | {r['trainable_params']:,} | {mfu} |"
            )
        summary = result["summary"][size]
        targets, shapes = targets_for(s)
        lines += [
            "",
            "The vs-full column and each target ratio are medians over rounds of the ratio within a round; "
            "the last column gives the lowest and highest round."
            + (
                ""
                if size in shapes
                else f" The targets are set for {' and '.join(shapes)}; here they are a guide."
            ),
            "",
            "| target | limit | measured | met | rounds (min-max) | side by side (passes min-max) |",
            "|---|---:|---:|:---:|---:|---:|",
        ]
        for key, label, limit, kind in targets:
            v, rounds = summary[key], summary[f"{key}_rounds"]
            met = "-" if v is None else "yes" if (v <= limit if kind == "max" else v >= limit) else "no"
            shown = "-" if v is None else f"{v:.3f}"
            spread = f"{min(rounds):.3f}-{max(rounds):.3f}" if len(rounds) > 1 else ""
            sign = "<=" if kind == "max" else ">="
            side = summary.get(f"{key}_paired")
            low, high = summary.get(f"{key}_paired_range") or (None, None)
            side = "-" if side is None else f"{side:.3f} ({low:.3f}-{high:.3f})"
            lines.append(f"| {label} | {sign} {limit} | {shown} | {met} | {spread} | {side} |")
        lines += lever_lines(summary) + generation_lines(rows, summary)
        pairs = result.get("paired", {}).get(size)
        if pairs and pairs.get("status") == "error":
            lines += ["", f"Side by side (`--paired`): {pairs['status']}: {pairs['reason']}"]
        profiled = {name: r["profile"] for name, r in rows.items() if r.get("profile")}
        if profiled:
            time_kind = "device" if cuda else "self"
            lines += ["", f"Top operators of one profiled step ({time_kind} time, first round), and the share of "
                      "it in matrix products:", ""]  # fmt: skip
            for name, prof in profiled.items():
                shown = ", ".join(
                    f"{o['op']} {o['self_ms']:.1f} ms ({100 * o['share']:.0f} %)" for o in prof["top"]
                )
                lines.append(f"- {name}: matrix products {100 * prof['matmul_share']:.0f} %; {shown}")
    lines += ["", FLOPS_NOTE if s["device"] == "cuda" else "", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Bars of tokens/s and peak memory per configuration, one row per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(result["results"])
    fig, axes = plt.subplots(len(sizes), 2, figsize=(11, 3.2 * len(sizes)), squeeze=False)
    for row, size in zip(axes, sizes, strict=True):
        rows = {n: r for n, r in result["results"][size].items() if r["status"] == "ok"}
        names = list(rows)
        colours = ["tab:blue" if rows[n]["trainable_params"] else "tab:green" for n in names]
        colours = ["tab:orange" if n.startswith("peft") else c for n, c in zip(names, colours, strict=True)]
        for ax, key, label in ((row[0], "tokens_per_s", "tokens/s"), (row[1], "peak_mem_mb", "peak MiB")):
            ax.barh(names, [rows[n][key] for n in names], color=colours)
            ax.invert_yaxis()
            ax.set_xlabel(label)
            ax.set_title(f"{size}: {label}", fontsize=10)
            ax.grid(axis="x", alpha=0.3)
    s = result["settings"]
    fig.suptitle(f"{result['machine']['gpu'] or result['machine']['cpu']}, {s['device']} {s['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
