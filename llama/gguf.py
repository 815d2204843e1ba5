"""The GGUF layout of Llama weights (llama.cpp's single-file format): tensor names, and how they
map to Meta's.

llama.cpp's converters store the query and key rows in Meta's interleaved rotary order (they undo
Hugging Face's "rotate half" order when converting), so a GGUF's q/k rows need no reordering here.
GGUF lists a tensor's shape fastest dimension first; numpy views of its data are (rows, columns)
as in Meta's checkpoints.
"""

from typing import Optional

from llama.files import rename

# Meta name -> GGUF name; {i} is the layer index.
META_TO_GGUF = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
    "layers.{i}.attention.wq.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.attention.wk.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.attention.wv.weight": "blk.{i}.attn_v.weight",
    "layers.{i}.attention.wo.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.feed_forward.w1.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.feed_forward.w2.weight": "blk.{i}.ffn_down.weight",
    "layers.{i}.feed_forward.w3.weight": "blk.{i}.ffn_up.weight",
    "layers.{i}.attention_norm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.ffn_norm.weight": "blk.{i}.ffn_norm.weight",
}
GGUF_TO_META = {g: m for m, g in META_TO_GGUF.items()}


def gguf_name(meta_name: str) -> Optional[str]:
    """GGUF name of a Meta checkpoint key (None for keys GGUF has no use for, e.g. rope.freqs)."""
    return rename(meta_name, META_TO_GGUF)


def meta_name(gguf_name: str) -> Optional[str]:
    """Meta name of a GGUF tensor (None for tensors Meta's layout lacks, e.g. rope_freqs.weight)."""
    return rename(gguf_name, GGUF_TO_META)
