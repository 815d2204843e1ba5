"""What quantized weights cost in accuracy: next-token predictions over a fixed text, each precision
against float32 on the same weights.

    python benchmarks/accuracy.py                 # SmolLM2-135M-Instruct (GGUF), as the tests find it
    python benchmarks/accuracy.py --ckpt DIR      # any checkpoint this package loads

The text: the first --tokens tokens of this repository's README.md followed by llama/sampling.py
(prose and code), one forward pass over all of them. Per precision: top-1 agreement of the
predictions with float32's, the largest difference of a logit, and the perplexity of the text.
Then the greedy answers (--answer_tokens new tokens) of a few code and chat prompts beside
float32's.
"""

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generate import smollm2_path  # noqa: E402
from llama import Llama  # noqa: E402

PROMPTS = ["def fibonacci(n: int) -> int:\n", "import os\nimport sys\n\n\ndef main():\n"]
DIALOGS = [[{"role": "user", "content": "Write a Python function that reverses a string."}],
           [{"role": "user", "content": "What is a linked list? Answer in two sentences."}]]


def precisions(group_sizes):
    yield "float32", {}
    yield "bfloat16 model", {"dtype": "bfloat16"}
    yield "int8", {"quantize": "int8"}
    for g in group_sizes:
        yield f"int4, groups of {g}", {"quantize": "int4", "group_size": g}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", default=None, help="default: SmolLM2-135M-Instruct's GGUF")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--answer_tokens", type=int, default=24)
    parser.add_argument("--group_sizes", type=int, nargs="*", default=[32, 64])
    a = parser.parse_args()
    ckpt = a.ckpt or str(smollm2_path())
    text = (ROOT / "README.md").read_text() + (ROOT / "llama" / "sampling.py").read_text()
    rows, answers = [], {}
    reference = None
    for name, kw in precisions(a.group_sizes):
        kw = {"dtype": "float32", **kw}
        try:
            g = Llama.build(ckpt, max_seq_len=a.tokens + 64, max_batch_size=2, device="cpu", **kw)
        except ValueError as e:  # a group size that does not fit this model's widths
            print(f"{name}: {e}")
            continue
        tokens = g.tokenizer.encode(text, bos=True, eos=False)[: a.tokens]
        with torch.inference_mode():
            logits = g.model.forward(torch.tensor([tokens]), 0)[0].float()
        g.model.cache = None
        nll = F.cross_entropy(logits[:-1], torch.tensor(tokens[1:]))
        if reference is None:
            reference = logits
        rows.append((name, (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
                     (logits - reference).abs().max().item(), math.exp(nll.item())))
        completions = [c["generation"] for c in g.text_completion(PROMPTS, temperature=0, max_gen_len=a.answer_tokens)]
        chats = [c["generation"]["content"] for c in g.chat_completion(DIALOGS, temperature=0,
                                                                         max_gen_len=a.answer_tokens)]
        answers[name] = completions + chats
    print(f"{ckpt}: {a.tokens} tokens of README.md + llama/sampling.py, torch {torch.__version__}")
    print("| weights | top-1 agreement | largest logit difference | perplexity |")
    print("|---|---|---|---|")
    for name, agree, diff, ppl in rows:
        print(f"| {name} | {agree:.1%} | {diff:.2f} | {ppl:.2f} |")
    base = answers["float32"]
    print(f"\ngreedy answers ({a.answer_tokens} tokens) equal to float32's, per prompt "
          f"({len(PROMPTS)} completions, {len(DIALOGS)} chats):")
    for name, got in answers.items():
        print(f"- {name}: {[x == y for x, y in zip(got, base)]}")
    for name, got in answers.items():
        print(f"\n{name}:")
        for x in got:
            print(f"    {x!r}")


if __name__ == "__main__":
    main()
