"""Code infilling: the model writes the code between a prefix and a suffix (7B and 13B models
and their Instruct variants).

    torchrun --nproc_per_node 1 example_infilling.py --ckpt_dir CodeLlama-7b/ --tokenizer_path CodeLlama-7b/tokenizer.model
"""

from typing import Optional

from llama import Llama
from llama.cli import fire_checked
from llama.distributed import is_main_process


def main(
    ckpt_dir: str,
    tokenizer_path: Optional[str] = None,  # None: the tokenizer in the checkpoint folder
    temperature: float = 0.0,
    top_p: float = 0.9,
    max_seq_len: int = 192,
    max_gen_len: int = 128,
    max_batch_size: int = 4,
    stream: bool = False,
    speculative: Optional[str] = None,
    speculative_tokens: Optional[int] = None,
):
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        speculative=speculative,
        speculative_tokens=speculative_tokens,
    )

    prompts = [
        '''def count_words(path: str) -> dict[str, int]:
    """Count how often each word occurs in the file at `path`."""
    <FILL>
    return counts
''',
        """# Build and test from a fresh clone:
```bash
<FILL>
```
""",
        """class LRUCache:
    def __init__(self, capacity: int):
<FILL>
    def get(self, key):
        if key not in self.items:
            return None
        self.items.move_to_end(key)
        return self.items[key]
""",
    ]
    prefixes = [p.split("<FILL>")[0] for p in prompts]
    suffixes = [p.split("<FILL>")[1] for p in prompts]
    if stream:  # print the prefix, then the middle as it is made, then the suffix
        for prompt, prefix, suffix in zip(prompts, prefixes, suffixes):
            show("\n================= Prompt text =================\n\n" + prompt)
            show("\n================= Filled text =================\n\n" + prefix)
            for text in generator.text_infilling_stream(prefix, suffix, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p):
                show(text)
            show(suffix + "\n")
        return
    results = generator.text_infilling(
        prefixes=prefixes,
        suffixes=suffixes,
        max_gen_len=max_gen_len,
        temperature=temperature,
        top_p=top_p,
    )
    for prompt, result in zip(prompts, results):
        show("\n================= Prompt text =================\n\n" + prompt)
        show("\n================= Filled text =================\n\n" + result["full_text"] + "\n")


def show(text: str) -> None:
    if is_main_process():
        print(text, end="", flush=True)


if __name__ == "__main__":
    fire_checked(main)
