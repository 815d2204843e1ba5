"""Run under torchrun: quantized builds on several processes, for tests/test_quantize.py.

    torchrun --standalone --nproc_per_node 2 tests/mp_quantized.py OUT_DIR 'NAME=CKPT_DIR[:MODE[:GROUP]]' ...

Each spec is built in turn (MODE, GROUP: Llama.build's quantize and group_size; none: as the
checkpoint declares) and asked for the logits of fixed tokens, a ragged batch of greedy
completions and a stream; a build that fails records its error. Rank R saves {NAME: results} to
OUT_DIR/rank{R}.pt.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from llama import Llama  # noqa: E402

DEVICE = os.environ.get("LLAMA_TEST_DEVICE", "cpu")  # what tests/device.py hands down

TOKENS = [[1, 45, 300, 12, 77, 8, 150, 9, 260, 33], [1, 7, 7, 7, 99, 400, 2, 5, 6, 10]]
PROMPTS = ["def fibonacci(n: int) -> int:", "import os", "The quick brown fox jumps over the lazy dog. Write"]


def results(spec: str) -> dict:
    ckpt, mode, group = (spec.split(":") + [None, None])[:3]
    try:
        generator = Llama.build(ckpt, f"{ckpt}/tokenizer.model", max_seq_len=128, max_batch_size=4, device=DEVICE,
                                dtype="float32", quantize=mode or None, group_size=int(group) if group else None)
    except ValueError as e:
        return {"error": str(e)}
    return {
        "logits": generator.model.forward(torch.tensor(TOKENS), 0),
        "completion": [g["generation"] for g in generator.text_completion(PROMPTS, temperature=0, max_gen_len=12)],
        "stream": list(generator.text_completion_stream(PROMPTS[0], temperature=0, max_gen_len=12)),
    }


if __name__ == "__main__":
    out, *specs = sys.argv[1:]
    answers = {name: results(spec) for name, spec in (s.split("=", 1) for s in specs)}
    torch.save(answers, Path(out, f"rank{dist.get_rank()}.pt"))
