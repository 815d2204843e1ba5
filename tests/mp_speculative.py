"""Run under torchrun: tests/mp_requests.py's requests with speculative decoding.

    torchrun --standalone --nproc_per_node 2 tests/mp_speculative.py OUT_DIR TARGET_DIR DRAFT_DIR

Rank R writes {"ngram": answers, "draft": answers} to OUT_DIR/rank{R}.json, each with the
engine's speculative statistics under "stats".
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch.distributed as dist  # noqa: E402

import mp_requests  # noqa: E402
from llama import Llama  # noqa: E402


def answers(target: str, speculative: str) -> dict:
    generator = Llama.build(target, f"{target}/tokenizer.model", max_seq_len=128, max_batch_size=4,
                            device=mp_requests.DEVICE, dtype="float32", speculative=speculative)
    out = mp_requests.requests(generator)
    s = generator.engine.speculative_stats
    out["stats"] = {"proposed": s.proposed, "accepted": s.accepted}
    return out


if __name__ == "__main__":
    out, target, draft = sys.argv[1:]
    result = {"ngram": answers(target, "ngram"), "draft": answers(target, draft)}
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
