"""What only a GPU can show: the decode loop never makes the host wait for the GPU between the
engine's sync steps (a wait per token would leave the GPU idle while Python catches up), eager and
compiled. Skipped, saying so, unless LLAMA_TEST_DEVICE=cuda."""

import pytest
import torch

from device import ON_CUDA
from llama import Llama
from llama.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not ON_CUDA, reason="needs LLAMA_TEST_DEVICE=cuda and a GPU")


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (0.8, 0.9)], ids=["greedy", "top_p"])
def test_decode_steps_never_wait_for_the_gpu(tiny_dir, compile, temperature, top_p):
    g = Llama.build(str(tiny_dir), str(tiny_dir / "tokenizer.model"), 128, 4, device="cuda", dtype="bfloat16",
                    compile=compile)
    engine = g.engine
    prompts = [[1, 5, 9, 200], [1, 7], [1, 3, 3, 3, 3, 3, 8]]
    params = [SamplingParams(temperature=temperature, top_p=top_p, max_gen_len=40, logprobs=True)] * 3
    batch = engine.open_batch(stop_ids=[2], logprobs=True)
    engine.admit(batch, [0, 1, 2], prompts, params)
    batch.step(sync=False)  # a compiled step compiles and records its graph here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):
            batch.step(sync=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    updates = batch.step(sync=True)  # the host reads the tokens here, once
    assert sorted(u.row for u in updates) == [0, 1, 2] and all(len(u.tokens) > 0 or u.finish_reason for u in updates)
