"""Run under torchrun: the prefix cache's library requests of tests/test_prefix_cache.py.

    torchrun --standalone --nproc_per_node 2 tests/mp_prefix.py OUT_DIR CKPT_DIR PROMPTS_JSON

Each rank builds the checkpoint with a tiny prefix cache (it evicts) and 5-token prefill chunks,
runs the prompts twice (greedy) and writes {"answers": [...], "stats": {...}} to OUT_DIR/rank{R}.json.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.distributed as dist  # noqa: E402

from llama import Llama  # noqa: E402

DEVICE = os.environ.get("LLAMA_TEST_DEVICE", "cpu")

if __name__ == "__main__":
    out, ckpt, prompts = sys.argv[1], sys.argv[2], json.loads(Path(sys.argv[3]).read_text())
    g = Llama.build(ckpt, max_seq_len=128, max_batch_size=4, device=DEVICE, dtype="float32",
                    prefix_cache_mb=0.025, prefill_chunk_size=5)
    answers = [g.generate(prompts, max_gen_len=12, temperature=0)[0] for _ in range(2)]
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps({"answers": answers,
                                                                     "stats": g.engine.prefix_cache.stats()}))
