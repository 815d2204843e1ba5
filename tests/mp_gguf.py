"""Run under torchrun: a GGUF model split over the processes through Llama.build (the file's own
vocabulary), its logits for some token lists and its greedy generation.

    torchrun --standalone --nproc_per_node 3 tests/mp_gguf.py GGUF_FILE OUT_FILE TOKENS_JSON [BUILD_KWARGS_JSON]

Rank 0 saves {"logits": float32 logits of model.forward(tokens, 0), "tokens", "logprobs": greedy
generation from the same lists} to OUT_FILE (tests/test_gguf.py).
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

if __name__ == "__main__":
    path, out, tokens = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    kwargs = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}  # e.g. {"quantize": "int4"}
    generator = Llama.build(path, max_seq_len=64, max_batch_size=len(tokens), device=DEVICE, dtype="float32", **kwargs)
    with torch.inference_mode():
        logits = generator.model.forward(torch.tensor(tokens), 0)
    generated, logprobs = generator.generate(tokens, 8, temperature=0, logprobs=True, stop_token=-1)
    if dist.get_rank() == 0:
        torch.save({"logits": logits, "tokens": generated, "logprobs": logprobs}, out)
