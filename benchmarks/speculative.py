"""Speculative decoding against plain decoding, greedy, one run each: tokens/s, acceptance rate,
tokens per target forward, and whether the answers are identical.

    python benchmarks/speculative.py                          # SmolLM2-135M-Instruct (GGUF), as the tests find it
    python benchmarks/speculative.py --ckpt CodeLlama-7b-Instruct/ --draft SMALLER_CKPT/ --device cuda --dtype bfloat16

Workloads, each a chat request (the checkpoint's chat format):
- code edit: rewrite a given 50-line function with one change (the answer repeats most of it);
- free writing: a short essay on a topic not in the prompt.
Systems: plain, speculative="ngram" (prompt lookup), and speculative=--draft when given; each
workload runs --repeat times, systems alternating, and the median time counts (the statistics are
the last run's).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generate import smollm2_path  # noqa: E402
from llama import Llama  # noqa: E402

FUNCTION = "\n".join(
    [
        "def summarize(records, key, threshold=0.5):",
        '    """Group records by key and report count, mean, min and max of their values."""',
        "    groups = {}",
        "    for record in records:",
        "        name = record[key]",
        "        value = record['value']",
        "        if value is None:",
        "            continue",
        "        if name not in groups:",
        "            groups[name] = []",
        "        groups[name].append(value)",
        "    report = []",
    ]
    + [
        line
        for i in range(6)
        for line in (
            f"    # pass {i}: values above threshold * {i + 1}",
            "    for name, values in groups.items():",
            f"        above = [v for v in values if v > threshold * {i + 1}]",
            "        if above:",
            f"            report.append((name, {i}, len(above), sum(above) / len(above)))",
            "",
        )
    ]
    + ["    report.sort()", "    return report"]
)
WORKLOADS = {
    "code edit": ("Rewrite this Python function, renaming the parameter `threshold` to `limit`. Answer with "
                  f"the whole function only.\n\n```python\n{FUNCTION}\n```", 600),
    "free writing": ("Write a short essay about the history of the bicycle and why people still ride them.", 200),
}


def run(generator, prompt, max_gen_len):
    """(answer tokens' text, new tokens, seconds)."""
    dialog = [{"role": "user", "content": prompt}]
    start = time.perf_counter()
    out = generator.chat_completion([dialog], temperature=0, max_gen_len=max_gen_len, logprobs=True)[0]
    if generator.model.device.type == "cuda":
        torch.cuda.synchronize()
    return out["generation"]["content"], len(out["tokens"]), time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", default=None, help="default: SmolLM2-135M-Instruct's GGUF")
    parser.add_argument("--draft", default=None, help="a draft checkpoint with the same tokenizer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max_gen_len", type=int, default=None, help="cap every workload's answer (smoke runs)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each system per workload (median time)")
    a = parser.parse_args()
    ckpt = a.ckpt or str(smollm2_path())
    systems = {"plain": None, "ngram": "ngram", **({"draft": a.draft} if a.draft else {})}
    generators = {name: Llama.build(ckpt, max_seq_len=2048, max_batch_size=1, device=a.device, dtype=a.dtype,
                                    speculative=spec) for name, spec in systems.items()}
    print(f"{ckpt}: {a.device}, {a.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| workload | system | new tokens | tokens/s | vs plain | acceptance | tokens per target forward | same answer |")
    print("|---|---|---|---|---|---|---|---|")
    for workload, (prompt, max_gen_len) in WORKLOADS.items():
        max_gen_len = min(max_gen_len, a.max_gen_len or max_gen_len)
        times = {name: [] for name in generators}
        answers, stats = {}, {}
        for _ in range(a.repeat):  # systems alternate within each repetition; the median counts
            for name, g in generators.items():
                if g.engine.speculative_stats:
                    g.engine.speculative_stats.reset()
                text, n, seconds = run(g, prompt, max_gen_len)
                answers[name] = (text, n)
                times[name].append(seconds)
                stats[name] = g.engine.speculative_stats
        base_text, base_n = answers["plain"]
        base_rate = base_n / statistics.median(times["plain"])
        for name in generators:
            text, n = answers[name]
            rate = n / statistics.median(times[name])
            s = stats[name]
            acc = f"{s.acceptance_rate:.2f}" if s else "-"
            tpf = f"{s.tokens_per_forward:.2f}" if s else "1.00"
            print(f"| {workload} | {name} | {n} | {rate:.1f} | {rate / base_rate:.2f}x | {acc} | {tpf} "
                  f"| {text == base_text} |")


if __name__ == "__main__":
    main()
