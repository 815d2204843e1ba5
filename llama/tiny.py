"""Write a tiny random Code Llama in Meta's exact layout, to try everything without real weights.

    python -m llama.tiny OUT_DIR [--mp N] [--step] [--no-infill]

OUT_DIR gets tokenizer.model (a small sentencepiece BPE tokenizer with byte fallback and Code
Llama's special pieces), params.json, consolidated.NN.pth (bfloat16, one per model-parallel rank)
and checklist.chk. The weights are random, so the model's output is gibberish by design.
"""

import argparse
import io
import json
from pathlib import Path
from typing import Dict

import sentencepiece as spm
import torch

from llama.cli import reports_user_errors
from llama.files import write_checklist
from llama.model import ModelArgs
from llama.parallel import shard_of
from llama.tokenizer import EOT_PIECE, MIDDLE_PIECE, PREFIX_PIECE, SMILEY_PIECE, STEP_PIECE, SUFFIX_PIECE

# A small mixed corpus of code and prose: enough for a few hundred BPE merges.
_CORPUS = '''
def fibonacci(n: int) -> int:
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()

import os
import sys
for i in range(10):
    print(f"value {i}: {i * i}")
with open("data.txt") as f:
    lines = [line.strip() for line in f if line]
result = {key: value for key, value in zip(keys, values)}
def remove_non_ascii(s: str) -> str:
    return "".join(c for c in s if ord(c) < 128)
function add(a, b) { return a + b; }
const items = list.map((x) => x * 2).filter((x) => x > 10);
#include <stdio.h>
int main(int argc, char **argv) { printf("hello, world\\n"); return 0; }
SELECT name, count(*) FROM users WHERE age > 21 GROUP BY name ORDER BY name;
ls -la | grep ".txt" && find . -name "*.py" -mtime -30
The quick brown fox jumps over the lazy dog. Write a function that returns the sum of a list.
In Bash, how do I list all text files in the current directory that were modified last month?
What is the difference between inorder and preorder traversal? Give an example in Python.
Provide answers in JavaScript. The answer is a short program with comments and tests.
'''


def train_tokenizer(path: Path, infill: bool = True, step: bool = False, vocab_size: int = 512) -> None:
    """Train a BPE tokenizer configured like Llama's (byte fallback, split digits, identity
    normalisation) and append the special pieces as ordinary pieces, as the released ones are.

    The corpus supports about 512 pieces; a larger vocab_size is reached with unused pieces, so
    that a model can have a realistic embedding and output size."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb  # needs protobuf

    lines = [line for line in _CORPUS.splitlines() if line.strip()] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=min(vocab_size, 512), model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    proto = sp_pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    extra = [SMILEY_PIECE]
    if infill:
        extra += [PREFIX_PIECE, SUFFIX_PIECE, MIDDLE_PIECE, EOT_PIECE]
    if step:
        extra.append(STEP_PIECE)
    for piece in extra:
        proto.pieces.add(piece=piece, score=-1e9, type=sp_pb.ModelProto.SentencePiece.NORMAL)
    # Like the released vocabularies (32000, 32016), the size splits evenly over up to 8 ranks.
    while len(proto.pieces) % 8 or len(proto.pieces) < vocab_size:
        proto.pieces.add(piece=f"<unused{len(proto.pieces)}>", score=-1e9, type=sp_pb.ModelProto.SentencePiece.UNUSED)
    path.write_bytes(proto.SerializeToString())


def random_weights(args: ModelArgs, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A full (unsharded) float32 state dict with Meta's key names, scaled so that logits vary."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std):
        return torch.randn(*shape, generator=g) * std

    d, hd, ffn = args.dim, args.head_dim, args.ffn_hidden_dim
    state = {"tok_embeddings.weight": randn(args.vocab_size, d, std=1.0)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        state[p + "attention.wq.weight"] = randn(args.n_heads * hd, d, std=d**-0.5)
        state[p + "attention.wk.weight"] = randn(args.n_kv_heads * hd, d, std=d**-0.5)
        state[p + "attention.wv.weight"] = randn(args.n_kv_heads * hd, d, std=d**-0.5)
        state[p + "attention.wo.weight"] = randn(d, args.n_heads * hd, std=d**-0.5)
        state[p + "feed_forward.w1.weight"] = randn(ffn, d, std=d**-0.5)
        state[p + "feed_forward.w2.weight"] = randn(d, ffn, std=ffn**-0.5)
        state[p + "feed_forward.w3.weight"] = randn(ffn, d, std=d**-0.5)
        state[p + "attention_norm.weight"] = 1 + randn(d, std=0.1)
        state[p + "ffn_norm.weight"] = 1 + randn(d, std=0.1)
    state["norm.weight"] = 1 + randn(d, std=0.1)
    state["output.weight"] = randn(args.vocab_size, d, std=2 * d**-0.5)
    # Meta's Llama checkpoints carry this unused table; loaders must ignore it.
    state["rope.freqs"] = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    return state


def write_tiny_model(
    out_dir, mp: int = 1, step: bool = False, infill: bool = True, dim: int = 64, n_layers: int = 2,
    n_heads: int = 4, n_kv_heads: int = 2, vocab_size: int = 512, seed: int = 0,
    multiple_of: int = 32, ffn_dim_multiplier: float = 1.0,
) -> Path:
    """Write a random model in Meta's layout into out_dir; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out / "tokenizer.model", infill=infill, step=step, vocab_size=vocab_size)
    n_words = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).vocab_size()
    params = {
        "dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
        "multiple_of": multiple_of, "ffn_dim_multiplier": ffn_dim_multiplier, "norm_eps": 1e-5, "rope_theta": 1000000,
    }
    if n_heads % mp or n_kv_heads % mp:
        raise ValueError(f"--mp {mp} must divide n_heads={n_heads} and n_kv_heads={n_kv_heads}")
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    state = random_weights(ModelArgs(**params, vocab_size=n_words), seed)
    for rank in range(mp):
        shard = {k: shard_of(k, t, rank, mp).to(torch.bfloat16).clone() for k, t in state.items()}
        torch.save(shard, out / f"consolidated.{rank:02d}.pth")
    write_checklist(out)
    return out


@reports_user_errors("python -m llama.tiny")
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llama.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write (created if missing)")
    parser.add_argument("--mp", type=int, default=1, help="model-parallel shards to write (default 1)")
    parser.add_argument("--step", action="store_true", help="add the 70B <step> piece (70B chat format)")
    parser.add_argument("--no-infill", dest="infill", action="store_false", help="leave out the infilling pieces")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--n_layers", type=int, default=2)
    parser.add_argument("--n_heads", type=int, default=4)
    parser.add_argument("--n_kv_heads", type=int, default=2)
    parser.add_argument("--vocab_size", type=int, default=512,
                        help="vocabulary size (above 512, unused pieces fill it up)")
    parser.add_argument("--multiple_of", type=int, default=32)
    parser.add_argument("--ffn_dim_multiplier", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    out = write_tiny_model(
        a.out_dir, mp=a.mp, step=a.step, infill=a.infill, dim=a.dim, n_layers=a.n_layers,
        n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, vocab_size=a.vocab_size, seed=a.seed,
        multiple_of=a.multiple_of, ffn_dim_multiplier=a.ffn_dim_multiplier,
    )
    print(f"wrote a random model to {out} (its output is gibberish by design)")


if __name__ == "__main__":
    main()
