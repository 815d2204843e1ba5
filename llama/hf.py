"""The Hugging Face layout of Llama weights, and how it maps to Meta's.

Hugging Face names every tensor differently and stores the rows of the query and key projections
in a "rotate half" order: within each head, the first halves of Meta's interleaved (even, odd)
rotary pairs come first, then the second halves.
"""

import re
from typing import Dict, Optional

import torch

from llama.model import ModelArgs

# Meta name -> Hugging Face name; {i} is the layer index.
META_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}
HF_TO_META = {hf: meta for meta, hf in META_TO_HF.items()}


def _rename(name: str, table: Dict[str, str]) -> Optional[str]:
    m = re.search(r"\.(\d+)\.", name)
    if m:
        pattern = name.replace(m.group(0), ".{i}.", 1)
        return table[pattern].format(i=m.group(1)) if pattern in table else None
    return table.get(name)


def hf_name(meta_name: str) -> Optional[str]:
    """Hugging Face name of a Meta checkpoint key (None for keys HF has no use for, e.g. rope.freqs)."""
    return _rename(meta_name, META_TO_HF)


def meta_name(hf_name: str) -> Optional[str]:
    """Meta name of a Hugging Face key (None for keys Meta's layout lacks, e.g. rotary buffers)."""
    return _rename(hf_name, HF_TO_META)


def to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a Meta q/k projection (heads x [pairs x 2]) reordered for Hugging Face."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a Hugging Face q/k projection put back in Meta's interleaved rotary order."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_to_hf_tensor(name: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    if name.endswith("attention.wq.weight"):
        return to_rotate_half(tensor, args.n_heads)
    if name.endswith("attention.wk.weight"):
        return to_rotate_half(tensor, args.n_kv_heads)
    return tensor


def hf_to_meta_tensor(meta_key: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    if meta_key.endswith("attention.wq.weight"):
        return to_interleaved(tensor, args.n_heads)
    if meta_key.endswith("attention.wk.weight"):
        return to_interleaved(tensor, args.n_kv_heads)
    return tensor


def hf_config(args: ModelArgs, max_position_embeddings: int = 16384) -> dict:
    """config.json for transformers' LlamaForCausalLM with these hyper-parameters."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "num_hidden_layers": args.n_layers,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": float(args.rope_theta),
        "vocab_size": args.vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }
