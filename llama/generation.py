"""`Llama`: build a generator from a checkpoint, then complete, infill and chat.

The four public entry points (generate, text_completion, text_infilling, chat_completion) turn
their inputs into prompt tokens (llama.formats), run one generation core (`_generate`) and shape
its `Generation` records into the reference's result dicts.
"""

import sys
import time
import warnings
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, TypedDict, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch

from llama import checkpoint, distributed, engine
from llama.engine import RowUpdate
from llama.formats import (  # noqa: F401  (re-exported: the reference defines these here)
    B_INST,
    B_SYS,
    E_INST,
    E_SYS,
    SPECIAL_TAGS,
    UNSAFE_ERROR,
    Dialog,
    Message,
    Role,
    chat_prompt_tokens,
    chat_stop_ids,
    check_dialog,
    check_texts,
    completion_prompt_tokens,
    dialog_prompt_tokens,
    has_special_tags,
    infilling_prompt_tokens,
    infilling_stop_ids,
)
from llama.model import Transformer
from llama.sampling import check_sampling, sample, sample_top_p  # noqa: F401
from llama.tokenizer import StreamDecoder, Tokenizer


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # with logprobs=True
    logprobs: List[float]  # with logprobs=True


class InfillingPrediction(TypedDict, total=False):
    generation: str
    full_text: str
    tokens: List[str]  # with logprobs=True
    logprobs: List[float]  # with logprobs=True


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # with logprobs=True
    logprobs: List[float]  # with logprobs=True


@dataclass
class Generation:
    """What one prompt produced."""

    tokens: List[int]  # generated ids (prompt + generated with echo), without the stop token
    logprobs: Optional[List[float]]  # log-probability of each of `tokens` (0.0 for the first prompt token)


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: Union[None, str, torch.dtype], device: torch.device) -> torch.dtype:
    """The dtype asked for, else bfloat16 on CUDA (float16 where bf16 is unsupported), float16 on
    MPS, float32 on CPU."""
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"unsupported dtype {dtype!r}; use 'float32', 'bfloat16' or 'float16'")


def trained_context(rope_theta: float) -> int:
    """Longest sequence a Code Llama model was trained on: 16k tokens with the long-context rotary
    base (1e6; stable to about 100k), 4k with Llama 2's 1e4 (70B-Python and -Instruct)."""
    return 16384 if rope_theta >= 1e6 else 4096


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: str,
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        *,
        dtype: Union[None, str, torch.dtype] = None,
        device: Union[None, str, torch.device] = None,
        seed: int = 1,
        compile: bool = False,
        prefill_chunk_size: int = 2048,
    ) -> "Llama":
        """Load a checkpoint in Meta's layout (params.json, consolidated.NN.pth, tokenizer.model).

        Args:
            ckpt_dir: folder with params.json and one consolidated.NN.pth per model-parallel rank.
            tokenizer_path: the checkpoint's tokenizer.model.
            max_seq_len: longest prompt + generation, in tokens.
            max_batch_size: most prompts run together; longer lists are served in batches.
            model_parallel_size: defaults to the number of processes (torchrun's WORLD_SIZE).
            dtype: torch dtype or its name; default bfloat16 on CUDA (float16 without bf16 support),
                float16 on MPS, float32 on CPU.
            device: default CUDA (GPU LOCAL_RANK) when available, else MPS, else CPU.
            seed: sampling seed; the same on every rank so that all ranks pick the same tokens.
            compile: compile the decode step with torch.compile (CUDA graphs on a GPU). The first
                batches of each size compile (a minute or more); falls back to eager on failure.
            prefill_chunk_size: prompts go through the model at most this many tokens at a time,
                which bounds the memory of a long prompt's prefill.
        Returns:
            a Llama generator; `.model` is the Transformer, `.tokenizer` the Tokenizer.
        """
        _positive_int("max_seq_len", max_seq_len)
        _positive_int("max_batch_size", max_batch_size)
        _positive_int("prefill_chunk_size", prefill_chunk_size)
        start = time.time()
        device = distributed.resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        mp_size = distributed.setup_model_parallel(model_parallel_size, device)
        tokenizer = Tokenizer(tokenizer_path)
        model = checkpoint.load_model(
            ckpt_dir,
            vocab_size=tokenizer.n_words,
            max_seq_len=max_seq_len,
            max_batch_size=max_batch_size,
            mp_rank=fs_init.get_model_parallel_rank(),
            mp_size=mp_size,
            dtype=dtype,
            device=device,
            show_progress=distributed.is_main_process(),
        )
        if distributed.is_main_process():
            print(f"Loaded in {time.time() - start:.2f} seconds", file=sys.stderr)
        return Llama(model, tokenizer, seed=seed, compile=compile, prefill_chunk_size=prefill_chunk_size)

    def __init__(
        self, model: Transformer, tokenizer: Tokenizer, seed: int = 1, compile: bool = False,
        prefill_chunk_size: int = 2048,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.output.weight.device
        self.rng = torch.Generator(device=self.device).manual_seed(seed)
        self.decode = engine.CompiledDecode(model) if compile else engine.eager_decode
        self.prefill_chunk_size = prefill_chunk_size

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        stop_token: Optional[int] = None,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each list of token ids.

        Args:
            prompt_tokens: one list of ids per prompt (BOS included if wanted).
            max_gen_len: most new tokens per prompt (also bounded by max_seq_len).
            temperature, top_p: 0 is greedy; otherwise nucleus sampling.
            logprobs: also return each returned token's log-probability.
            echo: return the prompt's tokens before the generated ones.
            stop_token: generation of a row ends at this id (default EOS); it is not returned.
        Returns:
            (tokens per prompt, log-probabilities per prompt or None).
        """
        stop_ids = [self.tokenizer.eos_id if stop_token is None else stop_token]
        gens = self._generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, stop_ids)
        return [g.tokens for g in gens], ([g.logprobs for g in gens] if logprobs else None)

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> List[CompletionPrediction]:
        """Continue each prompt (BOS + prompt). max_gen_len defaults to max_seq_len - 1."""
        check_texts(prompts, "prompts")
        prompt_tokens = [completion_prompt_tokens(self.tokenizer, p) for p in prompts]
        gens = self._generate(
            prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, [self.tokenizer.eos_id]
        )
        return [self._prediction(g, self.tokenizer.decode(g.tokens), logprobs) for g in gens]

    def text_infilling(
        self,
        prefixes: List[str],
        suffixes: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        suffix_first: bool = False,
    ) -> List[InfillingPrediction]:
        """Write the code between each prefix and suffix (7B/13B models and their Instruct variants).

        Returns the middle as "generation" and prefix + middle + suffix as "full_text"."""
        check_texts(prefixes, "prefixes")
        check_texts(suffixes, "suffixes")
        if len(prefixes) != len(suffixes):
            raise ValueError(f"got {len(prefixes)} prefixes but {len(suffixes)} suffixes; pass one suffix per prefix")
        prompt_tokens = [
            infilling_prompt_tokens(self.tokenizer, pre, suf, suffix_first=suffix_first)
            for pre, suf in zip(prefixes, suffixes)
        ]
        gens = self._generate(
            prompt_tokens, max_gen_len, temperature, top_p, logprobs, False, infilling_stop_ids(self.tokenizer)
        )
        results = []
        for pre, suf, g in zip(prefixes, suffixes, gens):
            middle = self.tokenizer.decode_infilling(g.tokens)
            results.append({**self._prediction(g, middle, logprobs), "full_text": pre + middle + suf})
        return results

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
    ) -> List[ChatPrediction]:
        """Answer each dialog as the assistant: the Llama-2 [INST] format, or the 70B turn format when
        the tokenizer has a <step> piece (then answers also carry "destination": "user")."""
        if not isinstance(dialogs, (list, tuple)):
            raise TypeError(f"dialogs must be a list of dialogs, not {type(dialogs).__name__}")
        for i, dialog in enumerate(dialogs):
            check_dialog(dialog, i)
        prompt_tokens = [chat_prompt_tokens(self.tokenizer, d) for d in dialogs]
        gens = self._generate(
            prompt_tokens, max_gen_len, temperature, top_p, logprobs, False, chat_stop_ids(self.tokenizer)
        )
        results = []
        for dialog, g in zip(dialogs, gens):
            content = UNSAFE_ERROR if has_special_tags(dialog) else self.tokenizer.decode(g.tokens)
            message = {"role": "assistant", "content": content}
            if self.tokenizer.step_id is not None:
                message["destination"] = "user"
            results.append(self._prediction(g, message, logprobs))
        return results

    # Streaming: one prompt at a time, text as it is made ---------------------------------------

    def text_completion_stream(
        self, prompt: str, temperature: float = 0.6, top_p: float = 0.9, max_gen_len: Optional[int] = None
    ) -> Iterator[str]:
        """Like text_completion for one prompt, but yields the generation as it is made: the pieces
        join to exactly the text text_completion returns."""
        check_texts([prompt], "prompts")
        tokens = completion_prompt_tokens(self.tokenizer, prompt)
        return self._stream(tokens, max_gen_len, temperature, top_p, [self.tokenizer.eos_id], self.tokenizer.decode)

    def text_infilling_stream(
        self,
        prefix: str,
        suffix: str,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        suffix_first: bool = False,
    ) -> Iterator[str]:
        """Like text_infilling for one prefix and suffix, yielding the middle as it is made."""
        check_texts([prefix, suffix], "prefix and suffix")
        tokens = infilling_prompt_tokens(self.tokenizer, prefix, suffix, suffix_first=suffix_first)
        stop = infilling_stop_ids(self.tokenizer)
        return self._stream(tokens, max_gen_len, temperature, top_p, stop, self.tokenizer.decode_infilling)

    def chat_completion_stream(
        self, dialog: Dialog, temperature: float = 0.6, top_p: float = 0.9, max_gen_len: Optional[int] = None
    ) -> Iterator[str]:
        """Like chat_completion for one dialog, yielding the answer's content as it is made."""
        check_dialog(dialog)
        tokens = chat_prompt_tokens(self.tokenizer, dialog)
        if has_special_tags(dialog):
            self._check_request([tokens], max_gen_len, temperature, top_p)
            return iter([UNSAFE_ERROR])
        stop = chat_stop_ids(self.tokenizer)
        return self._stream(tokens, max_gen_len, temperature, top_p, stop, self.tokenizer.decode)

    def _stream(self, tokens, max_gen_len, temperature, top_p, stop_ids, decode) -> Iterator[str]:
        max_gen_len = self._check_request([tokens], max_gen_len, temperature, top_p)  # raise now, not on first next()

        @torch.inference_mode()  # entered only while the generator runs, not between its yields
        def deltas():
            decoder = StreamDecoder(decode)
            for updates in self._run([tokens], max_gen_len, temperature, top_p, False, False, stop_ids, 1):
                for t in updates[0].tokens:
                    text = decoder.push(t)
                    if text:
                        yield text
            tail = decoder.flush()
            if tail:
                yield tail

        return deltas()

    def _prediction(self, g: Generation, generation, logprobs: bool) -> dict:
        if not logprobs:
            return {"generation": generation}
        pieces = [self.tokenizer.token_piece(t) for t in g.tokens]
        return {"generation": generation, "tokens": pieces, "logprobs": g.logprobs}

    # The generation core -------------------------------------------------------------------

    @torch.inference_mode()
    def _generate(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: Optional[int],
        temperature: float,
        top_p: float,
        logprobs: bool,
        echo: bool,
        stop_ids: Sequence[int],
    ) -> List[Generation]:
        """Check the request, then run it in batches of at most max_batch_size prompts."""
        params = self.model.params
        max_gen_len = self._check_request(prompt_tokens, max_gen_len, temperature, top_p)
        out: List[Generation] = []
        for i in range(0, len(prompt_tokens), params.max_batch_size):
            batch = [list(p) for p in prompt_tokens[i : i + params.max_batch_size]]
            out += self._generate_batch(batch, max_gen_len, temperature, top_p, logprobs, echo, stop_ids)
        return out

    def _check_request(self, prompt_tokens, max_gen_len: Optional[int], temperature: float, top_p: float) -> int:
        """Raise on a bad request; returns max_gen_len with its default filled in."""
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        if not isinstance(max_gen_len, int) or isinstance(max_gen_len, bool) or max_gen_len < 0:
            raise ValueError(f"max_gen_len must be an integer >= 0, got {max_gen_len!r}")
        check_sampling(temperature, top_p)
        self._check_prompt_tokens(prompt_tokens)
        return max_gen_len

    def _check_prompt_tokens(self, prompt_tokens: Sequence[Sequence[int]]) -> None:
        if not isinstance(prompt_tokens, (list, tuple)):
            raise TypeError(f"prompt_tokens must be a list of lists of token ids, not {type(prompt_tokens).__name__}")
        max_seq_len, n_words = self.model.params.max_seq_len, self.model.params.vocab_size
        for i, p in enumerate(prompt_tokens):
            if not isinstance(p, (list, tuple)) or not all(isinstance(t, int) for t in p):
                raise TypeError(f"prompt {i} must be a list of int token ids")
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: it needs at least one token (for example BOS)")
            if len(p) > max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens, more than max_seq_len={max_seq_len}: shorten it or pass "
                    "a larger max_seq_len to Llama.build"
                )
            bad = [t for t in p if not 0 <= t < n_words]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {n_words}): {bad[:5]}")

    def _generate_batch(
        self,
        prompts: List[List[int]],
        max_gen_len: int,
        temperature: float,
        top_p: float,
        logprobs: bool,
        echo: bool,
        stop_ids: Sequence[int],
    ) -> List[Generation]:
        tokens = [[] for _ in prompts]
        lps = [[] for _ in prompts]
        prompt_lps = [[] for _ in prompts]
        # On a GPU, looking at the tokens every step would stall the queue of kernels.
        sync_every = 8 if self.device.type == "cuda" else 1
        for updates in self._run(prompts, max_gen_len, temperature, top_p, logprobs, echo and logprobs, stop_ids, sync_every):
            for u in updates:
                tokens[u.row] += u.tokens
                lps[u.row] += u.logprobs
                if u.prompt_logprobs is not None:
                    prompt_lps[u.row] = u.prompt_logprobs
        out = []
        for i, prompt in enumerate(prompts):
            toks, lp = tokens[i], lps[i]
            if echo:
                toks = prompt + toks
                lp = [0.0] + prompt_lps[i] + lp
            out.append(Generation(toks, lp if logprobs else None))
        return out

    def _run(
        self,
        prompts: List[List[int]],
        max_gen_len: Union[int, Sequence[int]],
        temperature: Union[float, Sequence[float]],
        top_p: Union[float, Sequence[float]],
        logprobs: bool,
        prompt_logprobs: bool,
        stop_ids: Sequence[int],
        sync_every: int,
    ) -> Iterator[List[RowUpdate]]:
        """The engine's updates for one batch of at most max_batch_size checked prompts.
        max_gen_len, temperature, top_p: one for all, or one per prompt."""
        budgets = self._budgets(prompts, max_gen_len)
        self._reserve(prompts, budgets, len(prompts))
        return engine.generate(
            self.model, prompts, budgets, stop_ids, temperature, top_p, self.rng,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, sync_every=sync_every, decode=self.decode,
            prefill_chunk=self.prefill_chunk_size,
        )

    def _budgets(self, prompts: List[List[int]], max_gen_len: Union[int, Sequence[int]]) -> List[int]:
        """New tokens each prompt may get: max_gen_len, and what max_seq_len leaves."""
        limits = max_gen_len if isinstance(max_gen_len, Sequence) else [max_gen_len] * len(prompts)
        return [min(n, self.model.params.max_seq_len - len(p)) for n, p in zip(limits, prompts)]

    def _reserve(self, prompts: List[List[int]], budgets: List[int], rows: int, rows_may_join: bool = False) -> None:
        """Make the KV cache ready for `rows` rows, the longest of which is a prompt + its budget
        (contents kept: rows already running stay). rows_may_join: more rows will join this
        batch later (a compiled decode step then takes the largest bucket from the start)."""
        longest, trained = max(len(p) for p in prompts), trained_context(self.model.params.rope_theta)
        if longest > trained:
            warnings.warn(
                f"a prompt of {longest} tokens is longer than the {trained} this model was trained on "
                f"(rope_theta={self.model.params.rope_theta:g}); quality may degrade"
            )
        seq_len = max(len(p) + b for p, b in zip(prompts, budgets))
        if isinstance(self.decode, engine.CompiledDecode):
            self.decode.use_cache(self.model.params.max_batch_size if rows_may_join else rows, seq_len)
        else:
            self.model.reserve_cache(rows, seq_len)

    def _batch(self, stop_ids: Sequence[int], logprobs: bool) -> engine.Batch:
        """An empty engine batch that rows can join (the server's)."""
        return engine.Batch(self.model, stop_ids, self.rng, logprobs, self.prefill_chunk_size, self.decode)
