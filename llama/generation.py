"""`Llama`: build a generator from a checkpoint, then complete, infill and chat.

The reference's surface, kept exactly: `Llama.build`, `generate`, `text_completion`,
`text_infilling`, `chat_completion`, `.model` and `.tokenizer`; plus streamed variants and the
public `.engine`. Each entry point checks its inputs, formats prompts into tokens
(llama.formats), runs them on the engine (llama.engine) and shapes the reference's result dicts.
"""

import sys
import time
import warnings
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, TypedDict, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch

from llama import distributed
from llama.answers import Answer
from llama.checks import check_int
from llama.engine import Engine, Generation
from llama.formats import (
    Dialog,
    Message,
    chat_prompt_tokens,
    chat_stop_ids,
    check_dialog,
    check_texts,
    completion_prompt_tokens,
    refuses_dialog,
    infilling_prompt_tokens,
    infilling_stop_ids,
)
from llama.loading import Placement, load_model, resolve_checkpoint
from llama.model import Transformer
from llama.quantization import check_request
from llama.sampling import SamplingParams
from llama.speculative import NGRAM, Speculator, check_same_tokenizer, check_speculative_tokens
from llama.tokenizer import TokenizerProtocol
from llama.vocabulary import load_tokenizer

# Compatibility: the reference defines these names in llama.generation, and scripts written for it
# import them from here. Each lives with its concern (prompt formats, sampling) and is re-exported
# unchanged; the prediction types below are the reference's too.
from llama.formats import B_INST, B_SYS, E_INST, E_SYS, SPECIAL_TAGS, UNSAFE_ERROR, Role  # noqa: F401
from llama.formats import dialog_prompt_tokens  # noqa: F401
from llama.sampling import sample_top_p  # noqa: F401


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


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: Optional[str] = None,
        max_seq_len: int = 4096,
        max_batch_size: int = 4,
        model_parallel_size: Optional[int] = None,
        *,
        dtype: Union[None, str, torch.dtype] = None,
        device: Union[None, str, torch.device] = None,
        seed: int = 1,
        compile: bool = False,
        prefill_chunk_size: int = 2048,
        prefix_cache_mb: float = 0,
        check_weights: bool = False,
        quantize: Optional[str] = None,
        group_size: Optional[int] = None,
        speculative: Optional[str] = None,
        speculative_tokens: Optional[int] = None,
    ) -> "Llama":
        """Load a checkpoint in Meta's layout (params.json, consolidated.NN.pth, tokenizer.model),
        Hugging Face's (config.json, model*.safetensors) or llama.cpp's (one .gguf file).

        Args:
            ckpt_dir: folder with params.json and consolidated.NN.pth shards (any number: each rank
                reads its slice), or with config.json and model*.safetensors, or a .gguf file (or a
                folder holding exactly one). GGUF tensors may be quantized (Q4_0 ... Q8_0, K-quants):
                they are dequantized into `dtype` as they load. Or a Hugging Face hub id,
                "owner/name[@revision]", fetched into the hub's cache (llama.hub).
            tokenizer_path: the checkpoint's tokenizer.model; None: the tokenizer the checkpoint
                folder carries.
            max_seq_len: longest prompt + generation, in tokens (the KV cache grows with the
                requests, so a large value costs nothing until it is used).
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
            prefix_cache_mb: keep the keys and values of prompts in a prefix cache of this many MiB
                per process (blocks of 16 tokens, least recently used evicted first), so a prompt
                that starts like an earlier one prefills only the rest; greedy answers are the
                same. 0 (the default): no cache, every prompt runs whole as in the reference.
            check_weights: check that every weight is finite as it is loaded, and name the first NaN
                or infinite one (off by default: it adds about 10% to a float32 load on CPU).
            quantize: "int8" or "int4": weight-only quantization of the attention and feed-forward
                projections (wq wk wv wo w1 w2 w3) as they load, each process its own slice; the
                embedding and the output layer stay in `dtype`. int8 has a scale per output row;
                int4 a scale and a zero per group of input columns. Activations go through the
                quantized products in bfloat16 (CPU, and CUDA; int4 on CUDA needs compute
                capability 8.0+). None: full precision, or the scheme a checkpoint written by
                `python -m llama.quantize` declares (it loads quantized, memory-mapped).
            group_size: int4's input columns per scale and zero: 32, 64, 128 or 256 (default: the
                largest of 128, 64, 32 that divides every projection's input width per process).
            speculative: speculative decoding (llama.speculative), with the same answers: "ngram"
                (prompt lookup: proposals copied from the prompt and the answer so far) or a draft
                checkpoint (a smaller model with this tokenizer, loaded with the same dtype, device,
                quantize and limits, and sharded like this one under torchrun). None: off.
            speculative_tokens: tokens proposed per step (>= 1); None: adaptive (grows while
                proposals are accepted, shrinks when they are not).
        Returns:
            a Llama generator; `.model` is the Transformer, `.tokenizer` the tokenizer, `.engine`
            the Engine that runs prompts on them.
        """
        check_int("max_seq_len", max_seq_len)
        check_int("max_batch_size", max_batch_size)
        check_int("prefill_chunk_size", prefill_chunk_size)
        check_request(quantize, group_size)
        check_speculative(speculative, speculative_tokens)
        ckpt_dir = resolve_checkpoint(ckpt_dir)  # first: a missing folder is named as such; a hub id is fetched
        start = time.time()
        device = distributed.resolve_device(device)
        dtype = distributed.resolve_dtype(dtype, device)
        mp_size = distributed.setup_model_parallel(model_parallel_size, device)
        tokenizer = load_tokenizer(tokenizer_path, ckpt_dir)
        placement = Placement(fs_init.get_model_parallel_rank(), mp_size, dtype, device)
        model = load_model(ckpt_dir, tokenizer.n_words, max_seq_len, max_batch_size, placement,
                           show_progress=distributed.is_main_process(), check_weights=check_weights,
                           quantize=quantize, group_size=group_size)
        speculator = None
        if speculative is not None:
            draft = None
            if speculative != NGRAM:
                draft = load_draft(speculative, tokenizer, model, placement, check_weights, quantize, group_size)
            speculator = Speculator(draft, speculative_tokens)
        if distributed.is_main_process():
            print(f"Loaded in {time.time() - start:.2f} seconds", file=sys.stderr)
        return Llama(model, tokenizer, seed=seed, compile=compile, prefill_chunk_size=prefill_chunk_size,
                     prefix_cache_mb=prefix_cache_mb, speculator=speculator)

    def __init__(
        self, model: Transformer, tokenizer: TokenizerProtocol, seed: int = 1, compile: bool = False,
        prefill_chunk_size: int = 2048, prefix_cache_mb: float = 0, speculator: Optional[Speculator] = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.engine = Engine(model, seed=seed, compile=compile, prefill_chunk_size=prefill_chunk_size,
                             prefix_cache_mb=prefix_cache_mb, speculator=speculator)

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
        params = SamplingParams(temperature, top_p, max_gen_len, logprobs)
        stop_ids = [self.tokenizer.eos_id if stop_token is None else stop_token]
        gens = self.engine.complete(prompt_tokens, params, stop_ids, echo=echo)
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
        """Continue each prompt (BOS + prompt). max_gen_len defaults to what max_seq_len leaves."""
        params = SamplingParams(temperature, top_p, max_gen_len, logprobs)
        check_texts(prompts, "prompts")
        prompt_tokens = [completion_prompt_tokens(self.tokenizer, p) for p in prompts]
        gens = self.engine.complete(prompt_tokens, params, [self.tokenizer.eos_id], echo=echo)
        return [self._prediction(g, self.tokenizer.decode(g.tokens)) for g in gens]

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
        params = SamplingParams(temperature, top_p, max_gen_len, logprobs)
        check_texts(prefixes, "prefixes")
        check_texts(suffixes, "suffixes")
        if len(prefixes) != len(suffixes):
            raise ValueError(f"got {len(prefixes)} prefixes but {len(suffixes)} suffixes; pass one suffix per prefix")
        prompt_tokens = [
            infilling_prompt_tokens(self.tokenizer, pre, suf, suffix_first=suffix_first)
            for pre, suf in zip(prefixes, suffixes)
        ]
        gens = self.engine.complete(prompt_tokens, params, infilling_stop_ids(self.tokenizer))
        results = []
        for pre, suf, g in zip(prefixes, suffixes, gens):
            middle = self.tokenizer.decode_infilling(g.tokens)
            results.append({**self._prediction(g, middle), "full_text": pre + middle + suf})
        return results

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
    ) -> List[ChatPrediction]:
        """Answer each dialog as the assistant, in the model's chat format: the chat template its
        checkpoint carries, else the 70B turn format when the tokenizer has a <step> piece (then
        answers also carry "destination": "user"), else the Llama-2 [INST] format."""
        params = SamplingParams(temperature, top_p, max_gen_len, logprobs)
        if not isinstance(dialogs, (list, tuple)):
            raise TypeError(f"dialogs must be a list of dialogs, not {type(dialogs).__name__}")
        for i, dialog in enumerate(dialogs):
            check_dialog(dialog, i)
        prompt_tokens = [chat_prompt_tokens(self.tokenizer, d) for d in dialogs]
        gens = self.engine.complete(prompt_tokens, params, chat_stop_ids(self.tokenizer))
        results = []
        for dialog, g in zip(dialogs, gens):
            content = UNSAFE_ERROR if refuses_dialog(self.tokenizer, dialog) else self.tokenizer.decode(g.tokens)
            message = {"role": "assistant", "content": content}
            if self.tokenizer.step_id is not None:
                message["destination"] = "user"
            results.append(self._prediction(g, message))
        return results

    # Streaming: one prompt at a time, text as it is made ---------------------------------------

    def text_completion_stream(
        self, prompt: str, temperature: float = 0.6, top_p: float = 0.9, max_gen_len: Optional[int] = None
    ) -> Iterator[str]:
        """Like text_completion for one prompt, but yields the generation as it is made: the pieces
        join to exactly the text text_completion returns."""
        params = SamplingParams(temperature, top_p, max_gen_len)
        check_texts([prompt], "prompts")
        tokens = completion_prompt_tokens(self.tokenizer, prompt)
        return self._stream(tokens, params, [self.tokenizer.eos_id], self.tokenizer.decode)

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
        params = SamplingParams(temperature, top_p, max_gen_len)
        check_texts([prefix, suffix], "prefix and suffix")
        tokens = infilling_prompt_tokens(self.tokenizer, prefix, suffix, suffix_first=suffix_first)
        return self._stream(tokens, params, infilling_stop_ids(self.tokenizer), self.tokenizer.decode_infilling)

    def chat_completion_stream(
        self, dialog: Dialog, temperature: float = 0.6, top_p: float = 0.9, max_gen_len: Optional[int] = None
    ) -> Iterator[str]:
        """Like chat_completion for one dialog, yielding the answer's content as it is made."""
        params = SamplingParams(temperature, top_p, max_gen_len)
        check_dialog(dialog)
        tokens = chat_prompt_tokens(self.tokenizer, dialog)
        if refuses_dialog(self.tokenizer, dialog):
            self.engine.check_prompts([tokens])
            return iter([UNSAFE_ERROR])
        return self._stream(tokens, params, chat_stop_ids(self.tokenizer), self.tokenizer.decode)

    def _stream(self, tokens: List[int], params: SamplingParams, stop_ids: List[int], decode) -> Iterator[str]:
        updates = self.engine.stream(tokens, params, stop_ids)  # a bad request raises now, not on first next()
        answer = Answer(decode)

        def deltas():
            for u in updates:
                text, _ = answer.add(u)
                if text:
                    yield text

        return deltas()

    def _prediction(self, g: Generation, generation) -> dict:
        if g.logprobs is None:
            return {"generation": generation}
        pieces = [self.tokenizer.token_piece(t) for t in g.tokens]
        return {"generation": generation, "tokens": pieces, "logprobs": g.logprobs}


def check_speculative(speculative, speculative_tokens) -> None:
    """Raise unless `speculative` is None, "ngram" or an existing draft checkpoint, and
    speculative_tokens None or an int >= 1."""
    check_speculative_tokens(speculative_tokens)
    if speculative is None and speculative_tokens is not None:
        raise ValueError('speculative_tokens is set but speculative is not: pass speculative="ngram" or a draft '
                         "checkpoint too")
    if speculative is None or speculative == NGRAM:
        return
    if not isinstance(speculative, (str, Path)):
        raise TypeError(f'speculative must be "ngram" or a draft checkpoint folder, not {type(speculative).__name__}')
    if not str(speculative) or not Path(speculative).exists():
        raise FileNotFoundError(f'speculative={str(speculative)!r}: no such draft checkpoint; pass "ngram" (prompt '
                                "lookup) or the folder (or .gguf file) of a draft model with the target's tokenizer")


def load_draft(ckpt_dir: str, tokenizer: TokenizerProtocol, target: Transformer, placement: Placement,
               check_weights: bool, quantize: Optional[str], group_size: Optional[int]) -> Transformer:
    """The draft model of speculative decoding, loaded like the target (dtype, device, limits,
    quantization). Under torchrun it is sharded like the target: each rank loads its slice with the
    same loader, so it costs 1/MP of the memory, needs no second process group, and its gathered
    logits are the same on every rank (a replicated draft would need a model built outside the
    model-parallel group that every parallel layer reads its world size from)."""
    draft_tokenizer = load_tokenizer(None, str(ckpt_dir))
    check_same_tokenizer(tokenizer, draft_tokenizer)
    args = target.params
    draft = load_model(str(ckpt_dir), tokenizer.n_words, args.max_seq_len, args.max_batch_size, placement,
                       show_progress=False, check_weights=check_weights, quantize=quantize, group_size=group_size)
    sizes = [sum(p.numel() for p in m.parameters()) for m in (draft, target)]
    if sizes[0] >= sizes[1]:
        warnings.warn(f"the draft model ({sizes[0]:,} parameters per process) is not smaller than the target "
                      f"({sizes[1]:,}): speculative decoding will be slower than plain decoding")
    return draft
