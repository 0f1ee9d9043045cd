"""End-to-end fine-tuning benchmark: qforge vs HF transformers on the same model, data, steps and optimizer.

    python benchmarks/e2e.py [--quick] [--out DIR]

Systems (each run in its own process, see e2e_case.py): `qforge` (packed varlen batches, fused linear
cross-entropy, the trainer's `train_step`), `qforge_lora` (the same with `train.method: lora` defaults, for the
LoRA-vs-FFT memory and speed comparison; `--systems qforge_lora`), `hf_padded` (HF Qwen3ForCausalLM, plain loop over 4 right-padded
rows per micro-batch: ~12 GB peak here, `--padded-rows 2` needs ~7 GB), `hf_padding_free` (HF with packed
rows and restarting position_ids, as TRL's padding-free collator), and on CUDA `hf_liger` (the padding-free
baseline with Liger-Kernel) when liger-kernel is installed. Runs are interleaved across systems so that load
changes hit every system alike; figures are medians over runs.
Writes DIR/e2e.json (per system: tokens_per_s, peak_mem_bytes, mfu, ..., plus qforge's ratios and the
loss-curve agreement) and DIR/e2e.png, and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from e2e_workload import MODEL, Workload, load, prepare  # noqa: E402

from qforge.engine.files import write_json  # noqa: E402

CASE = Path(__file__).with_name("e2e_case.py")
CPU_TARGETS = {"speedup_vs_hf_padded": (">=", 2.5), "speedup_vs_hf_padding_free": (">=", 1.3),
               "memory_ratio_vs_hf_padded": ("<=", 0.4), "mfu": (">=", 0.4)}
LOSS_TOLERANCE = {"cpu": 2e-3, "cuda": 5e-2}  # |Δ step loss| against qforge: fp32 on CPU, bf16 on CUDA
QUICK = Workload(steps=2, step_tokens=2048)
FULL = Workload(steps=3, step_tokens=3072)


def run_case(system: str, directory: Path, device: str) -> dict:
    command = [sys.executable, str(CASE), "--system", system, "--workload", str(directory), "--device", device]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 and not lines:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def summarise(runs: dict[str, list[dict]], device: str, warmup_steps: int) -> dict:
    """Medians per system; qforge's ratios to each baseline as the median over rounds of the ratio within a
    round (the runs of a round are minutes apart, so slow load changes cancel); MFU against the device's
    peak, the highest matmul rate measured by any process of this benchmark (each measures before and after
    training: a peak measured while the machine was busy would inflate that process's MFU)."""
    device_peak = max(r["matmul_peak_flops"] for results in runs.values() for r in results)
    for results in runs.values():
        for r in results:
            timed = r["steps"][warmup_steps:]
            r["useful_flops_per_s"] = sum(s["flops"] for s in timed) / sum(s["seconds"] for s in timed)
            r["mfu"] = r["useful_flops_per_s"] / device_peak
    systems = {}
    for name, results in runs.items():
        systems[name] = {key: statistics.median(r[key] for r in results)
                         for key in ("tokens_per_s", "peak_mem_bytes", "mfu")}
        systems[name] |= {key: results[0][key] for key in ("packing_efficiency", "padding_fraction")}
        systems[name]["runs"] = results
    ours = systems["qforge"]
    ratios, agreement = {"mfu": ours["mfu"]}, {}
    reference = [s["loss"] for s in ours["runs"][0]["steps"]]
    for name, figures in systems.items():
        if name == "qforge":
            continue
        rounds = list(zip(ours["runs"], figures["runs"]))
        for ratio, key in (("speedup", "tokens_per_s"), ("memory_ratio", "peak_mem_bytes")):
            ratios[f"{ratio}_vs_{name}"] = statistics.median(a[key] / b[key] for a, b in rounds)
        if name == "qforge_lora":  # another method (adapters), not another implementation: no loss agreement
            continue
        losses = [s["loss"] for s in figures["runs"][0]["steps"]]
        gap = max(abs(a - b) for a, b in zip(reference, losses))
        agreement[name] = {"max_abs_loss_diff": gap, "tolerance": LOSS_TOLERANCE[device],
                           "agree": gap <= LOSS_TOLERANCE[device]}
    targets = {}
    if device == "cpu":
        for key, (sense, bound) in CPU_TARGETS.items():
            if key in ratios:
                value = ratios[key]
                targets[key] = {"target": f"{sense} {bound}", "value": value,
                                "met": value >= bound if sense == ">=" else value <= bound}
    return {"device_peak_flops": device_peak, "systems": systems, "ratios": ratios, "loss_agreement": agreement,
            "targets": targets}


def table(summary: dict) -> str:
    ratios = summary["ratios"]
    lines = ["| system | real tokens/s | peak memory | MFU | packing efficiency | qforge speed-up | qforge memory |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in summary["systems"].items():
        speedup, memory = (ratios.get(f"{kind}_vs_{name}") for kind in ("speedup", "memory_ratio"))
        lines.append(f"| {name} | {s['tokens_per_s']:.0f} | {s['peak_mem_bytes'] / 2**30:.2f} GiB | "
                     f"{100 * s['mfu']:.1f}% | {100 * s['packing_efficiency']:.1f}% | "
                     f"{'—' if speedup is None else f'{speedup:.2f}×'} | "
                     f"{'—' if memory is None else f'{memory:.2f}×'} |")
    return "\n".join(lines)


def chart(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["systems"])
    systems = summary["systems"]
    colors = ["tab:green" if n == "qforge" else "tab:gray" for n in names]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    panels = [("real tokens/s", [systems[n]["tokens_per_s"] for n in names]),
              ("peak memory (GiB)", [systems[n]["peak_mem_bytes"] / 2**30 for n in names]),
              ("MFU (% of measured matmul peak)", [100 * systems[n]["mfu"] for n in names])]
    for ax, (title, values) in zip(axes, panels):
        ax.bar(names, values, color=colors)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
        for i, value in enumerate(values):
            ax.annotate(f"{value:.3g}", (i, value), ha="center", va="bottom")
    for name, style in zip(names, ("o-", "s--", "^:", "d-.")):  # the curves coincide: tell them apart
        steps = systems[name]["runs"][0]["steps"]
        axes[3].plot([s["step"] for s in steps], [s["loss"] for s in steps], style, label=name, alpha=0.8,
                     markersize=9 - 2 * names.index(name))
    axes[3].set_title("training loss per step (same data)")
    axes[3].set_xlabel("optimizer step")
    axes[3].legend()
    fig.suptitle("Qwen3 full fine-tuning: qforge vs HF transformers (medians over runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def describe(directory: Path, device: str) -> dict:
    workload, examples, plan = load(directory)
    used = [examples[i] for step in plan for i in step]
    lengths = [len(e) for e in used]
    return {"model": MODEL, "workload": asdict(workload), "device": device, "torch": torch.__version__,
            "examples": len(used), "tokens": sum(lengths), "min_length": min(lengths), "max_length": max(lengths),
            "mean_length": sum(lengths) / len(lengths),
            "supervised_fraction": sum(e.num_loss_tokens for e in used) / sum(lengths)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run of 2 short steps (a few minutes)")
    parser.add_argument("--out", type=Path, default=Path("runs/e2e"))
    parser.add_argument("--runs", type=int, help="runs per system (default: 1 with --quick, else 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--systems", nargs="+", help="subset of systems (qforge is always run)")
    parser.add_argument("--padded-rows", type=int, help=f"rows per padded micro-batch (default {FULL.padded_rows}; "
                        "HF's peak memory grows with rows × the longest row × the vocabulary)")
    args = parser.parse_args()

    workload = replace(QUICK if args.quick else FULL, **({"padded_rows": args.padded_rows} if args.padded_rows else {}))
    runs_per_system = args.runs or (1 if args.quick else 3)
    systems = ["qforge", "hf_padded", "hf_padding_free"] + (["hf_liger"] if args.device == "cuda" else [])
    if args.systems:
        systems = ["qforge"] + [s for s in args.systems if s != "qforge"]
    directory = prepare(args.out / "workload", workload)
    info = describe(directory, args.device)
    print(f"workload: {info['examples']} examples, {info['tokens']} tokens (lengths {info['min_length']}-"
          f"{info['max_length']}, mean {info['mean_length']:.0f}, {100 * info['supervised_fraction']:.0f}% "
          f"supervised) in {workload.steps} steps; model {MODEL}", flush=True)

    runs: dict[str, list[dict]] = {name: [] for name in systems}
    started = time.perf_counter()
    for run in range(runs_per_system):
        for name in systems:
            result = run_case(name, directory, args.device)
            if "skipped" in result:
                print(f"{name}: skipped ({result['skipped']})", flush=True)
                runs.pop(name, None)
                continue
            runs[name].append(result)
            print(f"run {run + 1}/{runs_per_system} {name}: {result['tokens_per_s']:.1f} tokens/s, peak "
                  f"{result['peak_mem_bytes'] / 2**30:.2f} GiB, MFU {100 * result['mfu']:.1f}%, losses "
                  f"{[round(s['loss'], 4) for s in result['steps']]}, load average "
                  f"{result['load_average'][0]:.1f}→{result['load_average'][1]:.1f} "
                  f"({time.perf_counter() - started:.0f} s)",
                  flush=True)
        systems = [name for name in systems if name in runs]
    summary = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "workload": info,
               **summarise(runs, args.device, workload.warmup_steps)}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "e2e.json", summary, indent=1)
    chart(summary, args.out / "e2e.png")
    print(table(summary))
    for name, check in summary["loss_agreement"].items():
        print(f"loss curve vs {name}: max |Δ| {check['max_abs_loss_diff']:.2e} "
              f"({'agrees' if check['agree'] else 'DISAGREES'}, tolerance {check['tolerance']:.0e})")
    for key, target in summary["targets"].items():
        print(f"target {key} {target['target']}: {target['value']:.3f} {'met' if target['met'] else 'MISSED'}")
    print(f"wrote {args.out / 'e2e.json'} and {args.out / 'e2e.png'}")


if __name__ == "__main__":
    main()
