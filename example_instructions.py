"""Instructions: the Instruct models answer dialogs (the Llama-2 [INST] format, or the 70B turn
format when the tokenizer has a <step> piece).

    torchrun --nproc_per_node 1 example_instructions.py --ckpt_dir CodeLlama-7b-Instruct/ --tokenizer_path CodeLlama-7b-Instruct/tokenizer.model
"""

from typing import List, Optional

from llama import Dialog, Llama
from llama.cli import fire_checked
from llama.distributed import is_main_process


def main(
    ckpt_dir: str,
    tokenizer_path: Optional[str] = None,  # None: the tokenizer in the checkpoint folder
    temperature: float = 0.2,
    top_p: float = 0.95,
    max_seq_len: int = 512,
    max_batch_size: int = 8,
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

    instructions: List[Dialog] = [
        [
            {
                "role": "user",
                "content": "In Python, how do I read a CSV file and print the sum of its second column?",
            }
        ],
        [
            {
                "role": "user",
                "content": "What does `git rebase -i HEAD~3` do?",
            },
            {
                "role": "assistant",
                "content": "It opens an editor listing the last three commits so you can reorder, squash or edit them.",
            },
            {
                "role": "user",
                "content": "How do I squash the last two into one?",
            },
        ],
        [
            {
                "role": "system",
                "content": "Answer with code only, in Rust.",
            },
            {
                "role": "user",
                "content": "Write a function that checks whether a string is a palindrome.",
            },
        ],
    ]
    if stream:  # print each answer as it is made
        for dialog in instructions:
            for msg in dialog:
                show(f"{msg['role'].capitalize()}: {msg['content']}\n\n")
            show("> Assistant: ")
            for text in generator.chat_completion_stream(dialog, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p):
                show(text)
            show("\n\n==================================\n\n")
        return
    results = generator.chat_completion(
        instructions,
        max_gen_len=max_gen_len,
        temperature=temperature,
        top_p=top_p,
    )
    for dialog, result in zip(instructions, results):
        for msg in dialog:
            show(f"{msg['role'].capitalize()}: {msg['content']}\n\n")
        show(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}\n")
        show("\n==================================\n\n")


def show(text: str) -> None:
    if is_main_process():
        print(text, end="", flush=True)


if __name__ == "__main__":
    fire_checked(main)
