"""The fused loss of this tree against the same file at another git revision, interleaved in one process on
identical inputs (full vocabulary and a restricted one): median of per-round time ratios, and the load average.

    python benchmarks/loss_revision_compare.py --base 8e12968 --tokens 512 --hidden 1024 --rounds 5

The old file is loaded from `git show REV:kernels/fused_linear_cross_entropy.py`. For the restricted case an old
revision gets `vocab_index` alone (the API before `target_index`), this tree gets both.
"""
import argparse
import importlib.util
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from qforge.kernels import fused_linear_cross_entropy

ROOT = Path(__file__).parents[1]


def load_revision(rev: str):
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:kernels/fused_linear_cross_entropy.py"],
                            capture_output=True, text=True, check=True).stdout
    source = source.replace("from .dispatch import", "from qforge.kernels.dispatch import")
    path = Path(tempfile.mkdtemp()) / "fused_linear_cross_entropy_base.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("fused_linear_cross_entropy_base", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fused_linear_cross_entropy


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare with")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    base = load_revision(args.base)
    T, H, V = args.tokens, args.hidden, args.vocab
    torch.manual_seed(0)
    hidden = torch.randn(T, H).requires_grad_()
    weight = (0.02 * torch.randn(V, H)).requires_grad_()
    labels = torch.randint(0, V, (T,))
    labels[: T // 4] = -100  # a prompt
    kept = torch.tensor([i for i in range(V) if i % 5])  # 80% kept, spread over the vocabulary
    table = torch.full((V,), -1, dtype=torch.long)
    table[kept] = torch.arange(len(kept))
    kept_labels = labels.masked_fill((labels % 5 == 0) & (labels >= 0), -100)
    base_takes_table = "target_index" in inspect.signature(base).parameters
    cases = {
        "full base": lambda: base(hidden, weight, labels),
        "full this": lambda: fused_linear_cross_entropy(hidden, weight, labels),
        "restricted base": lambda: base(hidden, weight, kept_labels, vocab_index=kept,
                                        **({"target_index": table} if base_takes_table else {})),
        "restricted this": lambda: fused_linear_cross_entropy(hidden, weight, kept_labels, vocab_index=kept,
                                                              target_index=table),
    }
    times = {name: [] for name in cases}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, fn in cases.items():
            hidden.grad = weight.grad = None
            start = time.perf_counter()
            fn().backward()
            if round_:
                times[name].append(time.perf_counter() - start)
    ratio = {what: statistics.median(t / b for t, b in zip(times[f"{what} this"], times[f"{what} base"]))
             for what in ("full", "restricted")}
    print(json.dumps({"base": args.base, "tokens": T, "hidden": H, "vocab": V, "threads": torch.get_num_threads(),
                      "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
                      "this/base (median of per-round ratios)": {k: round(v, 3) for k, v in ratio.items()},
                      "loadavg": os.getloadavg()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
