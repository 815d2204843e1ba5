"""Code completion: the model continues each prompt.

    torchrun --nproc_per_node 1 example_completion.py --ckpt_dir CodeLlama-7b/ --tokenizer_path CodeLlama-7b/tokenizer.model
"""

from typing import Optional

from llama import Llama
from llama.cli import fire_checked
from llama.distributed import is_main_process


def main(
    ckpt_dir: str,
    tokenizer_path: Optional[str] = None,  # None: the tokenizer in the checkpoint folder
    temperature: float = 0.2,
    top_p: float = 0.9,
    max_seq_len: int = 256,
    max_batch_size: int = 4,
    max_gen_len: Optional[int] = None,
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
        # For these prompts, the expected answer is the natural continuation of the prompt
        """\
import argparse

def main(string: str):
    print(string)
    print(string[::-1])

if __name__ == "__main__":""",
        """\
def merge_sorted(a: list[int], b: list[int]) -> list[int]:
    \"\"\"Merge two sorted lists into one sorted list.\"\"\"
""",
    ]
    if stream:  # print each answer as it is made (every rank runs the same generation)
        for prompt in prompts:
            show(prompt + "\n> ")
            for text in generator.text_completion_stream(prompt, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p):
                show(text)
            show("\n\n==================================\n\n")
        return
    results = generator.text_completion(
        prompts,
        max_gen_len=max_gen_len,
        temperature=temperature,
        top_p=top_p,
    )
    for prompt, result in zip(prompts, results):
        show(prompt + "\n")
        show(f"> {result['generation']}\n")
        show("\n==================================\n\n")


def show(text: str) -> None:
    if is_main_process():
        print(text, end="", flush=True)


if __name__ == "__main__":
    fire_checked(main)
