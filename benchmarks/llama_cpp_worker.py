"""llama.cpp's side of benchmarks/generate.py --llama_cpp: run with the Python that has
llama-cpp-python (it needs neither torch nor this package), on a GGUF export of the same weights.

    PYTHON_WITH_LLAMA_CPP benchmarks/llama_cpp_worker.py MODEL_F32.gguf WORK_DIR REQUEST.json

REQUEST.json: {"types": ["F32", "BF16", "Q8_0", "Q4_0"], "threads": 2, "repeat": 3, "decode_len": 48,
"prefill": [ids], "short": [ids], "ragged": [[ids], ...], "ragged_new": 16}. Each type other than F32
is made from the F32 file with llama.cpp's own quantizer (llama_model_quantize). Prints one JSON
line: per type, the file's bytes, median seconds of prefill, of decode (decode_len new tokens after
the short prompt, and 1 new token, so the difference is decode alone), of the ragged prompts (one
after another: the Python API runs one sequence at a time), and the greedy tokens of the ragged
prompts, to compare with this package's.
"""

import ctypes
import json
import os
import statistics
import sys
import time

import llama_cpp

FTYPES = {"F32": llama_cpp.LLAMA_FTYPE_ALL_F32, "BF16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16,
          "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}


def quantized(f32: str, work: str, kind: str, threads: int) -> str:
    if kind == "F32":
        return f32
    out = os.path.join(work, f"model-{kind}.gguf")
    if not os.path.exists(out):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FTYPES[kind]
        params.nthread = threads
        rc = llama_cpp.llama_model_quantize(f32.encode(), out.encode(), ctypes.byref(params))
        if rc != 0:
            raise SystemExit(f"llama_model_quantize to {kind} failed ({rc})")
    return out


def generate(llm, prompt, n):
    """Greedy: prefill `prompt`, then n new tokens (the last one is sampled, not fed back)."""
    llm.reset()
    llm.eval(prompt)
    out = []
    for i in range(n):
        tok = llm.sample(temp=0.0)
        out.append(tok)
        if i + 1 < n:
            llm.eval([tok])
    return out


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    f32, work, request = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
    threads, repeat = request["threads"], request["repeat"]
    results = {}
    for kind in request["types"]:
        path = quantized(f32, work, kind, threads)
        n_ctx = max(len(request["prefill"]), max(map(len, request["ragged"]))) + request["decode_len"] + 32
        llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                              verbose=False)
        work_items = {
            "prefill": lambda: generate(llm, request["prefill"], 1),
            "decode_first": lambda: generate(llm, request["short"], 1),
            "decode": lambda: generate(llm, request["short"], request["decode_len"] + 1),
            "ragged": lambda: [generate(llm, p, request["ragged_new"]) for p in request["ragged"]],
        }
        for fn in work_items.values():  # warm up
            fn()
        times = {k: statistics.median(timed(fn) for _ in range(repeat)) for k, fn in work_items.items()}
        results[kind] = {"bytes": os.path.getsize(path), "seconds": times,
                         "ragged_tokens": [generate(llm, p, request["ragged_new"]) for p in request["ragged"]]}
        del llm
    print(json.dumps(results))


if __name__ == "__main__":
    main()
