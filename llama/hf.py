"""The Hugging Face layout of Llama weights (config.json and model*.safetensors, or older
pytorch_model*.bin), and how it maps to Meta's.

Hugging Face names every tensor differently and stores the rows of the query and key projections
in a "rotate half" order: within each head, the first halves of Meta's interleaved (even, odd)
rotary pairs come first, then the second halves.
"""

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from llama.files import open_tensor_file, read_json, rename
from llama.model import ModelArgs
from llama.parallel import shard_bounds, shard_shape

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
UNUSED_SUFFIXES = ("rotary_emb.inv_freq",)  # rotary buffers older checkpoints carry; Meta's layout has none


def hf_name(meta_name: str) -> Optional[str]:
    """Hugging Face name of a Meta checkpoint key (None for keys HF has no use for, e.g. rope.freqs)."""
    return rename(meta_name, META_TO_HF)


def meta_name(hf_name: str) -> Optional[str]:
    """Meta name of a Hugging Face key (None for keys Meta's layout lacks, e.g. rotary buffers)."""
    return rename(hf_name, HF_TO_META)


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


# Reading the Hugging Face layout ------------------------------------------------------------


def is_hf_dir(folder: Path) -> bool:
    """Whether `folder` holds a Hugging Face checkpoint (its config.json)."""
    return (folder / "config.json").is_file()


def tied_embeddings(folder: Path) -> bool:
    """Whether config.json ties the output layer (lm_head) to the input embedding, as small models
    do (transformers' default for Llama: untied)."""
    return bool(read_json(folder / "config.json").get("tie_word_embeddings", False))


def ffn_params(dim: int, width: int) -> Tuple[int, Optional[float]]:
    """(multiple_of, ffn_dim_multiplier) that make Meta's FFN formula give `width` for `dim`."""
    for multiple_of, multiplier in ((256, 1.0), (4096, 1.3), (256, None), (width, None)):
        args = ModelArgs(dim=dim, multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
        if args.ffn_hidden_dim == width:
            return multiple_of, multiplier
    raise ValueError(f"no (multiple_of, ffn_dim_multiplier) gives an FFN width of {width} for dim {dim}")


def read_config(folder: Path) -> dict:
    """Meta's params.json for the model described by a Hugging Face config.json."""
    path = folder / "config.json"
    config = read_json(path)
    archs = config.get("architectures") or []
    if config.get("model_type") != "llama" or (archs and "LlamaForCausalLM" not in archs):
        raise ValueError(
            f"{path} describes a {config.get('model_type')!r} model ({', '.join(archs) or 'no architecture'}); "
            "only Llama models (LlamaForCausalLM, such as codellama/CodeLlama-7b-hf) are supported"
        )
    rope = config.get("rope_scaling") or (config.get("rope_parameters") or {})
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"{path}: rotary scaling {rope!r} is not supported")
    try:
        dim, width = config["hidden_size"], config["intermediate_size"]
        multiple_of, multiplier = ffn_params(dim, width)
        theta = config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        return {
            "dim": dim,
            "n_layers": config["num_hidden_layers"],
            "n_heads": config["num_attention_heads"],
            "n_kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
            "multiple_of": multiple_of,
            "ffn_dim_multiplier": multiplier,
            "norm_eps": config.get("rms_norm_eps", 1e-5),
            "rope_theta": theta,
        }
    except KeyError as e:
        raise ValueError(f"{path} lacks {e.args[0]!r}") from None


def weight_files(folder: Path) -> Dict[str, Path]:
    """Hugging Face tensor name -> the file that holds it, from the index if there is one."""
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = folder / index_name
        if index.is_file():
            weight_map = read_json(index)["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
            if missing:
                raise FileNotFoundError(
                    f"{index} names {len(missing)} file(s) that are not in {folder}: {', '.join(missing)}; "
                    "download them (the index lists every shard of the model)"
                )
            return {name: folder / f for name, f in weight_map.items()}
        files = sorted(folder.glob(pattern))
        if files:
            return {name: f for f in files for name in open_tensor_file(f).keys()}
    raise FileNotFoundError(f"{folder} has a config.json but no model*.safetensors or pytorch_model*.bin weights")


class HFReader:
    """Model-parallel rank `rank` of `mp_size`'s view of a Hugging Face checkpoint, in Meta's names,
    shapes and rotary layout (loading.WeightReader, as checkpoint.ShardReader). Each tensor is sliced
    for the rank before it is read; the q/k rows are put back into Meta's interleaved order. With
    tie_word_embeddings, the output layer is the input embedding, split by rows."""

    def __init__(self, folder: Path, params: dict, rank: int, mp_size: int):
        self.folder, self.rank, self.mp_size = folder, rank, mp_size
        self.n_heads, self.n_kv_heads = params["n_heads"], params["n_kv_heads"]
        self.files = weight_files(folder)
        self.names = {m: name for name in self.files if (m := meta_name(name)) is not None}
        unknown = sorted(n for n in self.files if meta_name(n) is None and not n.endswith(UNUSED_SUFFIXES))
        if unknown:
            raise ValueError(
                f"{folder} holds {len(unknown)} tensor(s) that are not part of a Llama model, e.g. {unknown[:3]}: "
                "only LlamaForCausalLM's own weights (unquantized, without adapters) can be loaded"
            )
        self.tied = tied_embeddings(folder) and "tok_embeddings.weight" in self.names
        if self.tied:
            self.names["output.weight"] = self.names["tok_embeddings.weight"]  # read again, split by rows
        elif "output.weight" not in self.names and "tok_embeddings.weight" in self.names:
            raise ValueError(
                f"{folder} lacks lm_head.weight (the output layer), and its config.json does not tie it to the input "
                "embedding (tie_word_embeddings is false): the download is incomplete; download the weights again"
            )
        self._handles: Dict[Path, object] = {}
        self.grid_keys = frozenset()  # only unquantized weights are read

    def describe(self) -> str:
        return ", ".join(sorted({p.name for p in self.files.values()}))

    def keys(self) -> List[str]:
        return list(self.names)

    def _slice(self, key: str):
        path = self.files[self.names[key]]
        if path not in self._handles:
            self._handles[path] = open_tensor_file(path)
        return self._handles[path].get_slice(self.names[key])

    def _full_shape(self, key: str) -> Tuple[int, ...]:
        s = self._slice(key)
        return tuple(s.get_shape() if hasattr(s, "get_shape") else s.shape)

    def vocab_rows(self) -> int:
        return self._full_shape("tok_embeddings.weight")[0]

    def shape(self, key: str) -> Tuple[int, ...]:
        return shard_shape(key, self._full_shape(key), self.mp_size)

    def dtype(self, key: str) -> torch.dtype:
        return self._slice(key)[0:0].dtype  # an empty slice: the stored dtype, no data read

    def read(self, key: str, dtype: Optional[torch.dtype] = None, device: torch.device = torch.device("cpu")) -> torch.Tensor:
        dim, lo, hi = shard_bounds(key, self._full_shape(key), self.rank, self.mp_size)
        s = self._slice(key)
        if dim is None:
            t = s[:]
        else:
            t = s[lo:hi] if dim == 0 else s[:, lo:hi]
        heads = {"attention.wq.weight": self.n_heads, "attention.wk.weight": self.n_kv_heads}
        for suffix, n_heads in heads.items():
            if key.endswith(suffix):
                t = to_interleaved(t, n_heads // self.mp_size)
        return t.to(device=device, dtype=dtype or t.dtype).contiguous()

    def grids(self, key: str) -> None:
        """None: no weight is stored on 4-bit grids here (loading.WeightReader)."""
        return None
