"""Run under torchrun: the requests that tests/test_distributed.py also runs in one process.

    torchrun --standalone --nproc_per_node 2 tests/mp_requests.py OUT_DIR NAME=CKPT_DIR [NAME=CKPT_DIR ...]

Each checkpoint is built in turn in the same process (whatever its number of shards) and asked
the requests for its kind of tokenizer; rank R writes {NAME: answers} to OUT_DIR/rank{R}.json.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from llama import Llama  # noqa: E402

DEVICE = os.environ.get("LLAMA_TEST_DEVICE", "cpu")  # what tests/device.py hands down

PROMPTS = ["def fibonacci(n: int) -> int:", "import os", "The quick brown fox jumps over the lazy dog. Write"]
PREFIX, SUFFIX = "def add(a, b):\n    ", "\n    return c\n"
DIALOG = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is a list?"},
    {"role": "assistant", "content": "A sequence."},
    {"role": "user", "content": "And a dict?"},
]


def chunked(generator: Llama) -> list:
    """Completion with echo and logprobs, prompts going through the model 7 tokens at a time."""
    generator.engine.prefill_chunk_size = 7
    try:
        return generator.text_completion(PROMPTS, temperature=0, max_gen_len=12, logprobs=True, echo=True)
    finally:
        generator.engine.prefill_chunk_size = 2048


TOKENS = [[1, 45, 300, 12, 77, 8, 150, 9, 260, 33], [1, 7, 7, 7, 99, 400, 2, 5, 6, 10]]


def requests(generator: Llama) -> dict:
    return {
        "logits": generator.model.forward(torch.tensor(TOKENS), 0).tolist(),
        "chunked": chunked(generator),
        "completion": generator.text_completion(PROMPTS, temperature=0, max_gen_len=12, logprobs=True),
        "echo": dict(zip(("tokens", "logprobs"), generator.generate(
            [[1, 45, 300, 12]], max_gen_len=6, temperature=0, logprobs=True, echo=True))),
        "sampled": generator.text_completion(PROMPTS, temperature=0.8, top_p=0.95, max_gen_len=12),
        "infill": generator.text_infilling([PREFIX], [SUFFIX], temperature=0, max_gen_len=10, logprobs=True),
        "infill_spm": generator.text_infilling([PREFIX], [SUFFIX], temperature=0, max_gen_len=10, suffix_first=True),
        "chat": generator.chat_completion([DIALOG], temperature=0, max_gen_len=10, logprobs=True),
        "stream": list(generator.text_completion_stream(PROMPTS[0], temperature=0, max_gen_len=12)),
        "infill_stream": list(generator.text_infilling_stream(PREFIX, SUFFIX, temperature=0, max_gen_len=10)),
    }


def step_requests(generator: Llama) -> dict:
    return {
        "chat70b": generator.chat_completion([DIALOG[1:]], temperature=0, max_gen_len=10, logprobs=True),
        "chat70b_stream": list(generator.chat_completion_stream(DIALOG[1:], temperature=0, max_gen_len=10)),
    }


def build(ckpt_dir: str) -> Llama:
    return Llama.build(ckpt_dir, f"{ckpt_dir}/tokenizer.model", max_seq_len=128, max_batch_size=4,
                       device=DEVICE, dtype="float32")


def answers(ckpt_dir: str) -> dict:
    generator = build(ckpt_dir)
    if generator.tokenizer.step_id is not None:
        return step_requests(generator)
    return requests(generator)


if __name__ == "__main__":
    out, *ckpts = sys.argv[1:]
    result = {name: answers(path) for name, path in (c.split("=", 1) for c in ckpts)}
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
