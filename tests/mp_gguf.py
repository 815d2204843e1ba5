"""Run under torchrun: a GGUF model split over the processes, its logits for some token lists.

    torchrun --standalone --nproc_per_node 3 tests/mp_gguf.py GGUF_FILE OUT_FILE TOKENS_JSON

Rank 0 saves the float32 logits of model.forward(tokens, 0) to OUT_FILE (tests/test_gguf.py).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fairscale.nn.model_parallel.initialize as fs_init  # noqa: E402
import torch  # noqa: E402

from llama import distributed  # noqa: E402
from llama.loading import Placement, load_model  # noqa: E402

VOCAB_SIZE = 49152  # SmolLM2's; the tokenizer the file carries says so once it can be read

if __name__ == "__main__":
    path, out, tokens = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    cpu = torch.device("cpu")
    mp = distributed.setup_model_parallel(None, cpu)
    placement = Placement(fs_init.get_model_parallel_rank(), mp, torch.float32, cpu)
    model = load_model(path, VOCAB_SIZE, 64, len(tokens), placement, show_progress=False)
    with torch.inference_mode():
        logits = model.forward(torch.tensor(tokens), 0)
    if fs_init.get_model_parallel_rank() == 0:
        torch.save(logits, out)
