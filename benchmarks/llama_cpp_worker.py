"""llama.cpp's side of benchmarks/generate.py --llama_cpp: run with the Python that has
llama-cpp-python (it needs neither torch nor this package), on a GGUF export of the same weights.

    PYTHON_WITH_LLAMA_CPP benchmarks/llama_cpp_worker.py MODEL.gguf WORK_DIR REQUEST.json   # F32, or any with as_is

REQUEST.json: {"types": ["F32", "BF16", "Q8_0", "Q4_0"], "threads": 2, "decode_len": 48,
"prefill": [ids], "short": [ids], "ragged": [[ids], ...], "ragged_new": 16}. Each type other than F32
is made from the F32 file with llama.cpp's own quantizer (llama_model_quantize); with "as_is": true,
the file is run as it is, under its one type's name (e.g. ["Q4_1"]). Every type is
loaded and warmed up, then the worker prints one JSON line (per type: the file's bytes and the
greedy tokens of the ragged prompts, to compare with this package's) and serves its caller, which
interleaves llama.cpp's runs with its own so that both meet the same machine: for each line read,
a workload's name, it runs that workload once with each type and prints one JSON line of seconds
per type. Workloads: prefill; decode_first and decode (1 and decode_len new tokens after the
short prompt, so their difference is decode alone); ragged (the prompts one after another: the
Python API runs one sequence at a time). It exits at the end of its input.
"""

import ctypes
import json
import os
import sys
import time

import llama_cpp

FTYPES = {"F32": llama_cpp.LLAMA_FTYPE_ALL_F32, "BF16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16,
          "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}


def quantized(source: str, work: str, kind: str, threads: int, as_is: bool) -> str:
    """The file of type `kind`: `source` itself (F32, or any type with as_is), else made from it."""
    if kind == "F32" or as_is:
        return source
    out = os.path.join(work, f"model-{kind}.gguf")
    if not os.path.exists(out):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FTYPES[kind]
        params.nthread = threads
        rc = llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params))
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
    source, work, request = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
    threads = request["threads"]
    n_ctx = max(len(request["prefill"]), max(map(len, request["ragged"]))) + request["decode_len"] + 32
    models, ready = {}, {}
    for kind in request["types"]:
        path = quantized(source, work, kind, threads, request.get("as_is", False))
        models[kind] = llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=512, n_threads=threads,
                                       n_threads_batch=threads, verbose=False)
        ready[kind] = {"bytes": os.path.getsize(path), "ragged_tokens": workload(models[kind], request, "ragged")}
    for llm in models.values():  # warm up
        for name in WORKLOADS:
            workload(llm, request, name)
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        name = line.strip()
        print(json.dumps({kind: timed(lambda: workload(llm, request, name)) for kind, llm in models.items()}),
              flush=True)


WORKLOADS = ("prefill", "decode_first", "decode", "ragged")


def workload(llm, request: dict, name: str):
    if name == "prefill":
        return generate(llm, request["prefill"], 1)
    if name == "decode_first":
        return generate(llm, request["short"], 1)
    if name == "decode":
        return generate(llm, request["short"], request["decode_len"] + 1)
    if name == "ragged":
        return [generate(llm, p, request["ragged_new"]) for p in request["ragged"]]
    raise SystemExit(f"unknown workload {name!r}: one of {', '.join(WORKLOADS)}")


if __name__ == "__main__":
    main()
