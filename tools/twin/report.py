"""The twin's report as a table (the JSON is the `run_twin` dict itself)."""
from __future__ import annotations

GIB = 2**30


def _objective(plan: dict) -> str:
    objective = plan.get("objective", "sft")
    if objective == "dpo":
        return f", DPO with {plan['reference']} reference"
    if objective == "distill-off-policy":
        return f", off-policy distillation (stored top-{plan['top_k']}, ce_weight {plan['ce_weight']})"
    if objective == "distill-on-policy":
        return f", on-policy distillation from {plan['teacher']} (bf16, sharded, scoring every micro-batch)"
    if objective == "grpo":
        reference = f"β {plan['beta']}: frozen bf16 reference" if plan["beta"] > 0 else "β 0: no reference"
        return (f", GRPO: {plan['group']} completions of {plan['completion_tokens']} tokens after a "
                f"{plan['prompt_tokens']}-token prompt per micro-batch, {reference}")
    return ""


def _rollout(rollout: dict) -> list[str]:
    """The rollout's closed-form memory (tools/twin/grpo.py: sampling is not traced)."""
    kv = rollout["kv_cache"]
    weights = "every unit gathered (gather_for_sampling)" if rollout["gather_for_sampling"] else \
        "the root and two blocks gathered at a time"
    verdict = "fits with ≥10% headroom" if rollout["fits"] else "does NOT fit with 10% headroom"
    return ["rollout (closed form, not traced; every completion at max_new_tokens):",
            f"  {'persistent state':<24} {rollout['persistent_bytes'] / GIB:8.2f} GiB (sharded weights, AdamW, "
            "reference: from the trace)",
            f"  {'sampling weights':<24} {rollout['sampling_weights_bytes'] / GIB:8.2f} GiB ({weights})",
            f"  {'KV cache':<24} {kv['peak_bytes'] / GIB:8.2f} GiB ({kv['capacity']} slots a layer and row, "
            "allocated once)",
            f"  {'prefill / logits':<24} {rollout['transient_bytes'] / GIB:8.2f} GiB",
            f"  {'peak (+2 GiB reserve)':<24} {rollout['peak_bytes'] / GIB:8.2f} GiB — {verdict}"]


def format_report(result: dict) -> str:
    plan, memory, roof = result["plan"], result["memory"], result["roofline"]
    length = plan["prompt_tokens"] + plan["completion_tokens"] if plan.get("objective") == "grpo" else plan["seq_len"]
    lines = [f"{plan['model']} on {plan['gpus']}× {result['gpu']['name']}: {plan['tokens']} tokens/GPU per micro-batch "
             f"(sequences of {length}), grad_accum {plan['grad_accum']}, {plan['precision']}, "
             f"activation checkpointing {'on' if plan['activation_checkpointing'] else 'off'}, "
             f"attention {plan['attention']}, AdamW moments {plan['optim_state_dtype']}"
             + _objective(plan),
             "memory per GPU at the step's peak (FSDPMemTracker):"]
    for name, value in memory["by_category_at_peak"].items():
        lines.append(f"  {name:<24} {value / GIB:8.2f} GiB")
        for frozen in ("reference", "teacher"):  # tracked with the trained model's
            if name == "parameters (sharded)" and f"{frozen}_sharded_bytes" in memory:
                lines.append(f"  {'  of which ' + frozen:<24} {memory[frozen + '_sharded_bytes'] / GIB:8.2f} GiB")
    lines.append(f"  {'(fused loss, peak inside)':<24} {memory['loss_temporaries_bytes'] / GIB:8.2f} GiB")
    lines.append(f"  {'runtime reserve (assumed)':<24} {memory['runtime_reserve_bytes'] / GIB:8.2f} GiB")
    verdict = "fits with ≥10% headroom" if memory["fits"] else "does NOT fit with 10% headroom"
    lines.append(f"  {'peak':<24} {memory['peak_bytes'] / GIB:8.2f} GiB of {result['gpu']['memory_bytes'] / GIB:.1f} "
                 f"GiB — {verdict}")
    if "rollout" in result:
        lines += _rollout(result["rollout"])
    lines.append("roofline per step (a bound from datasheet peaks, not a measurement):")
    for name, row in sorted(roof["by_op_class"].items(), key=lambda kv: -kv[1]["seconds"]):
        lines.append(f"  {name:<36} {row['flops'] / 1e12:9.2f} TFLOP {row['bytes'] / 1e9:9.2f} GB "
                     f"{row['seconds'] * 1e3:9.2f} ms")
    lines.append(f"  compute {roof['compute_seconds_per_step'] * 1e3:.1f} ms/step "
                 f"({roof['compute_seconds_per_micro_batch'] * 1e3:.1f} ms/micro-batch), collectives "
                 f"{roof['communication_seconds_per_step'] * 1e3:.1f} ms (overlapped by FSDP) → predicted MFU ≤ "
                 f"{roof['predicted_mfu_bound']:.1%}, ≤ {roof['tokens_per_s_per_gpu_bound']:.0f} tokens/s/GPU")
    if result.get("collective_volume"):
        lines.append("collectives per step and rank (full tensor sizes; a ring moves (n−1)/n of each): " + ", ".join(
            f"{kind} {row['bytes'] / 1e9:.2f} GB ({row['calls']} calls)"
            for kind, row in sorted(result["collective_volume"].items(), key=lambda kv: -kv[1]["bytes"])))
    syncs = result["host_syncs"]
    lines.append(f"host-device syncs ({sum(s['count'] for s in syncs)}):")
    for sync in syncs:
        lines.append(f"  {sync['site']:<58} {sync['op']:<20} {sync['where']:<8} ×{sync['count']}")
    checked = result.get("collectives_checked")
    if checked:
        lines.append(f"collectives: the same {checked['per_rank']} (op, shapes, dtypes, group) on all "
                     f"{checked['ranks']} ranks")
    return "\n".join(lines)


def format_load(result: dict) -> str:
    """`trace_load`'s figures: per rank, bytes read from the checkpoint and device memory during the load."""
    ranks = result["ranks"]
    lines = [f"load_sharded of {result['model']} ({result['checkpoint_bytes'] / GIB:.2f} GiB stored in "
             f"{result['stored_dtype']}) on {result['gpus']} ranks, {result['precision']} (twin bounds, not a measurement):",
             f"  {'rank':<5} {'read GiB':>9} {'of total':>9} {'largest read MiB':>17} {'host buffers MiB':>17} "
             f"{'device peak GiB':>16} {'shards GiB':>11} shard dtype"]
    for r in ranks:
        lines.append(f"  {r['rank']:<5} {r['read_bytes'] / GIB:9.3f} {r['read_bytes'] / result['checkpoint_bytes']:9.1%} "
                     f"{r['largest_read_bytes'] / 2**20:17.1f} {r['peak_host_buffer_bytes'] / 2**20:17.1f} "
                     f"{r['device_peak_bytes'] / GIB:16.3f} {r['shard_bytes'] / GIB:11.3f} {','.join(r['param_dtypes'])}")
    lines.append(f"  contract: every tensor's rows read exactly once over the ranks, none whole by one rank, in the stored "
                 f"dtype, one read buffer alive at a time ({result['reads_per_rank']} reads per rank)")
    return "\n".join(lines)


def format_export(result: dict) -> str:
    """`trace_export`'s figures: per rank, device and host memory at their peaks and the bytes written."""
    what = {"save_model": f"save_model (final/ in {result.get('dtype')}, parameters gathered one at a time)",
            "full_state_dict": "full_state_dict (fp32, offloaded to rank 0's host: LoRA export, snapshots)",
            "checkpoint": "checkpoint state (get_state_dict + dcp.save into a null writer, planned per rank)"}
    lines = [f"{what[result['what']]} of {result['model']} on {result['gpus']} ranks, {result['precision']} "
             f"(twin bounds, not a measurement; nothing written):",
             f"  {'rank':<5} {'shards GiB':>11} {'device peak GiB':>16} {'above shards GiB':>17} {'host peak GiB':>14} "
             f"{'written GiB':>12} {'items' if result['what'] == 'checkpoint' else 'files'}"]
    for r in result["ranks"]:
        lines.append(f"  {r['rank']:<5} {r['shard_bytes'] / GIB:11.3f} {r['device_peak_bytes'] / GIB:16.3f} "
                     f"{(r['device_peak_bytes'] - r['shard_bytes']) / GIB:17.3f} {r['peak_host_bytes'] / GIB:14.3f} "
                     f"{r['written_bytes'] / GIB:12.3f} {r.get('files', r.get('items'))}")
    if "collectives_per_rank" in result:
        lines.append(f"collectives: the same {result['collectives_per_rank']} (op, shapes, dtypes, group) on all "
                     f"{result['gpus']} ranks")
    return "\n".join(lines)
