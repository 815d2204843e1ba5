"""Speculative decoding against plain decoding, greedy: tokens/s, acceptance rate, tokens per
target forward, and whether the answers are identical, per workload and per family.

    python benchmarks/speculative.py                          # SmolLM2-135M-Instruct (GGUF), as the tests find it
    python benchmarks/speculative.py --answers                # and print each workload's plain answer
    python benchmarks/speculative.py --draft int4             # and a draft: the same model quantized to int4
    python benchmarks/speculative.py --ckpt CodeLlama-7b-Instruct/ --draft SMALLER_CKPT/ --device cuda --dtype bfloat16

Workloads (benchmarks/workloads.py):
- code edit, five chat requests: rewrite a given 40-50-line Python function or class (a config
  parser, a retry loop with logging, a data-cleaning routine, a class method, a log summary) with
  one small change (rename a variable or parameter, change a default or a constant, add a line);
  the answer may repeat most of the code. "edit made" says whether the answer makes the change (a
  regular expression per request);
- repeat nearby code: a plain completion of a file of similar methods, cut at the start of the
  next one. This stands in for "fill a middle that repeats nearby code": SmolLM2's tokenizer has
  no infilling pieces (`text_infilling` refuses it), so the code before the middle is completed;
- free writing, two chat requests: a short essay and an explanation, on topics not in the prompt.
Systems: plain, speculative="ngram" (prompt lookup), and speculative=--draft when given (a folder,
or int8 / int4: the target quantized by llama.quantize, int4 in groups of 32); each
workload runs --repeat times, systems alternating, and the median time counts (the statistics are
the last run's). A family's row adds up its workloads: new tokens / the sum of median times.
"""

import argparse
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generate import smollm2_path  # noqa: E402
from workloads import WORKLOADS  # noqa: E402
from llama import Llama  # noqa: E402
from llama.quantize import quantize_checkpoint  # noqa: E402


@dataclass
class Result:
    """One system's answer to one workload: its text, new tokens, median seconds and counts."""

    text: str
    tokens: int
    seconds: float
    proposed: int = 0
    accepted: int = 0
    row_forwards: int = 0
    made: int = 0  # tokens the verifications made


def run(generator, workload, max_gen_len):
    """(answer text, new tokens, seconds)."""
    start = time.perf_counter()
    if workload.chat:
        dialog = [{"role": "user", "content": workload.prompt}]
        out = generator.chat_completion([dialog], temperature=0, max_gen_len=max_gen_len, logprobs=True)[0]
        text = out["generation"]["content"]
    else:
        out = generator.text_completion([workload.prompt], temperature=0, max_gen_len=max_gen_len, logprobs=True)[0]
        text = out["generation"]
    if generator.model.device.type == "cuda":
        torch.cuda.synchronize()
    return text, len(out["tokens"]), time.perf_counter() - start


def measure(generators, workload, max_gen_len, repeat):
    """{system: Result} for one workload, systems alternating within each repetition."""
    times = {name: [] for name in generators}
    last = {}
    for _ in range(repeat):
        for name, g in generators.items():
            stats = g.engine.speculative_stats
            if stats:
                stats.reset()
            text, n, seconds = run(g, workload, max_gen_len)
            times[name].append(seconds)
            counts = (stats.proposed, stats.accepted, stats.row_forwards, stats.tokens) if stats else (0, 0, 0, 0)
            last[name] = (text, n, counts)
    return {name: Result(text, n, statistics.median(times[name]), *counts) for name, (text, n, counts) in last.items()}


def row(label, name, results, base, edit_made="-"):
    """A table row for system `name` over `results` (one workload's, or a family's), against `base` (plain's)."""
    tokens = sum(r.tokens for r in results)
    rate = tokens / sum(r.seconds for r in results)
    base_rate = sum(r.tokens for r in base) / sum(r.seconds for r in base)
    proposed, accepted = sum(r.proposed for r in results), sum(r.accepted for r in results)
    forwards, made = sum(r.row_forwards for r in results), sum(r.made for r in results)
    acc = f"{accepted / proposed:.2f}" if proposed else "-"
    tpf = f"{made / forwards:.2f}" if forwards else "1.00"
    same = all(r.text == b.text for r, b in zip(results, base))
    return (f"| {label} | {name} | {tokens} | {rate:.1f} | {rate / base_rate:.2f}x | {acc} | {tpf} | {same} "
            f"| {edit_made} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", default=None, help="default: SmolLM2-135M-Instruct's GGUF")
    parser.add_argument("--draft", default=None, help="a draft checkpoint with the same tokenizer, or int8 / int4: "
                        "the target quantized by llama.quantize (int4 in groups of 32) into a temporary folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max_gen_len", type=int, default=None, help="cap every workload's answer (smoke runs)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each system per workload (median time)")
    parser.add_argument("--answers", action="store_true", help="print each workload's plain answer after the table")
    a = parser.parse_args()
    ckpt = a.ckpt or str(smollm2_path())
    draft = a.draft
    if draft in ("int8", "int4"):  # the same model quantized: a draft that agrees with it, at a fraction of its bytes
        draft = str(quantize_checkpoint(ckpt, tempfile.mkdtemp(prefix="draft-"), draft, 32 if draft == "int4" else None))
    systems = {"plain": None, "ngram": "ngram", **({f"draft ({a.draft})": draft} if draft else {})}
    generators = {name: Llama.build(ckpt, max_seq_len=2048, max_batch_size=1, device=a.device, dtype=a.dtype,
                                    speculative=spec) for name, spec in systems.items()}
    print(f"{ckpt}: {a.device}, {a.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| workload | system | new tokens | tokens/s | vs plain | acceptance | tokens per target forward "
          "| same answer | edit made |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = {}  # workload -> {system: Result}
    for label, workload in WORKLOADS.items():
        results[label] = measure(generators, workload, min(workload.max_gen_len, a.max_gen_len or 10**9), a.repeat)
        made = "-" if workload.edit is None else str(bool(re.search(workload.edit, results[label]["plain"].text)))
        for name in generators:
            print(row(label, name, [results[label][name]], [results[label]["plain"]], made), flush=True)
    for family in dict.fromkeys(w.family for w in WORKLOADS.values()):
        labels = [label for label, w in WORKLOADS.items() if w.family == family]
        if len(labels) > 1:
            for name in generators:
                print(row(f"**{family}, all {len(labels)}**", name, [results[x][name] for x in labels],
                          [results[x]["plain"] for x in labels]))
    if a.answers:
        for label, by_system in results.items():
            print(f"\n--- {label} (plain, {by_system['plain'].tokens} tokens) ---\n{by_system['plain'].text}")


if __name__ == "__main__":
    main()
