from setuptools import find_packages, setup

setup(
    name="codellama",
    version="0.1.0",
    description="Code Llama inference: a drop-in replacement for Meta's reference llama package",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["llama", "llama.*"]),
    package_data={"llama": ["gemv.c"]},  # the CPU kernels' source, compiled on first use (llama/native.py)
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.5",  # scaled_dot_product_attention with grouped-query attention
        "fairscale",
        "fire",
        "sentencepiece",
        "protobuf",  # python -m llama.tiny edits sentencepiece models
        "safetensors",  # the Hugging Face layout
        "tqdm",
        "gguf",  # llama.cpp's single-file format
        "tokenizers",  # byte-level BPE vocabularies (GGUF "gpt2", Hugging Face tokenizer.json)
        "jinja2",  # chat templates carried by checkpoints
    ],
    entry_points={
        "console_scripts": [  # each is also `python -m llama.NAME`
            "llama-server = llama.server:main",
            "llama-convert = llama.convert:main",
            "llama-reshard = llama.reshard:main",
            "llama-quantize = llama.quantize:main",
            "llama-memory = llama.memory:main",
            "llama-tiny = llama.tiny:main",
        ],
    },
    extras_require={
        "server": ["starlette", "uvicorn", "pydantic>=2", "prometheus-client"],  # python -m llama.server
        "hub": ["huggingface_hub>=0.23"],  # Hugging Face hub ids as ckpt_dir (llama/hub.py)
        # transformers (+ accelerate for its GGUF loading): the reference for the Hugging Face and
        # GGUF layouts; openai, httpx: the server's clients
        "test": ["pytest", "transformers", "accelerate", "openai", "httpx", "starlette", "uvicorn",
                 "pydantic>=2", "prometheus-client", "huggingface_hub>=0.23"],
        "bench": ["transformers", "httpx"],
    },
)
