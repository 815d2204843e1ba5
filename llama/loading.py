"""Loading weights into a model, whatever the checkpoint's layout: the one reader interface, the
layout dispatch, params.json checked into ModelArgs, and a rank's share placed straight into its
Transformer. The top of the weights code: it sits on llama.checkpoint (Meta's layout), llama.hf
(Hugging Face's) and llama.gguf (llama.cpp's), which know nothing of each other. Projections are
quantized here as they load (llama.quantization), or read already quantized from a checkpoint that
declares it."""

import dataclasses
import warnings
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Protocol, Set, Tuple

import torch
from tqdm import tqdm

from llama import gguf, hf, hub
from llama.checkpoint import UNUSED_KEYS, ShardReader, read_params, shard_paths
from llama.checks import check_int, is_int
from llama.huge_pages import move_weights
from llama.kernels import quantized_device_problem
from llama.model import ModelArgs, Transformer
from llama.parallel import join_shared_inputs, shard_dim
from llama.quantization import (
    PARAMS_KEY,
    QuantizedTensors,
    Scheme,
    declared_scheme,
    from_grids,
    input_group,
    input_widths,
    install,
    is_projection,
    kernel_weight,
    quantize_shard,
    resolve_scheme,
    stored_tensors,
)


class WeightReader(Protocol):
    """Model-parallel rank `rank` of `mp_size`'s view of a checkpoint, in Meta's names, shapes and
    rotary layout: checkpoint.ShardReader (Meta's layout), hf.HFReader (Hugging Face's) and
    gguf.GGUFWeightReader (llama.cpp's)."""

    tied: bool  # output.weight is the input embedding, read again (split by rows)
    # The projections stored on 4-bit grids of gguf.GRID_COLUMNS columns (a GGUF file's Q4 blocks),
    # which grids() reads; none where they are stored as floats
    grid_keys: FrozenSet[str]

    def describe(self) -> str:
        """The files read, for messages and progress bars."""
        ...

    def keys(self) -> List[str]:
        """The tensors the checkpoint holds, in Meta's names."""
        ...

    def vocab_rows(self) -> int:
        """The vocabulary size of the checkpoint (rows of tok_embeddings.weight)."""
        ...

    def shape(self, key: str) -> Tuple[int, ...]:
        """Shape of this rank's part of `key`, without reading any data."""
        ...

    def dtype(self, key: str) -> torch.dtype:
        """The dtype `key` is stored in, without reading any data."""
        ...

    def read(self, key: str, dtype: Optional[torch.dtype] = None, device: torch.device = torch.device("cpu")) -> torch.Tensor:
        """This rank's part of `key` in `dtype` (default: as stored) on `device`."""
        ...

    def grids(self, key: str) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """This rank's part of `key` as the 4-bit grids of 32 columns it is stored in (codes (N, K) in
        0..15; scale, low (N, K / 32): value = scale * code + low), or None where it is not stored so."""
        ...


def checkpoint_folder(ckpt_dir: str) -> Path:
    """The folder of the checkpoint `ckpt_dir` names (a folder, or a .gguf file in one), which must
    exist (checked before anything is read from it)."""
    path = Path(ckpt_dir)
    if path.suffix == ".gguf" and path.is_file():
        return path.parent
    if not path.is_dir():
        hint = " (it is a file; pass the folder that holds it, or a .gguf file)" if path.exists() else ""
        what = "file" if path.suffix == ".gguf" else "folder"
        raise FileNotFoundError(f"checkpoint {what} not found: {str(path)!r}{hint}")
    return path


def resolve_checkpoint(ckpt_dir: str) -> str:
    """The local path of the checkpoint `ckpt_dir` names, checked to exist: `ckpt_dir` itself, or
    for a Hugging Face hub id ("owner/name", llama.hub) its copy in the hub's cache, downloaded if
    needed. The first thing done with a checkpoint argument."""
    path = hub.resolve(str(ckpt_dir))
    checkpoint_folder(path)
    return path


def gguf_file(ckpt_dir: str) -> Optional[Path]:
    """The GGUF file `ckpt_dir` is, or the one a folder of no other weights holds; None for Meta's
    and Hugging Face's layouts. A folder of several .gguf files is an error listing them."""
    path = Path(ckpt_dir)
    if path.suffix == ".gguf" and path.is_file():
        return path
    if any(path.glob("*.pth")) or any(path.glob("*.safetensors")) or any(path.glob("*.bin")):
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise ValueError(
            f"{str(path)!r} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}); pass the path of "
            "the one to load as ckpt_dir"
        )
    return found[0] if found else None


def params_file(ckpt_dir: str) -> Path:
    """The file the hyper-parameters of the checkpoint `ckpt_dir` names come from, which tells its
    layout: a .gguf file (llama.cpp's), config.json (Hugging Face's) or params.json (Meta's)."""
    folder = checkpoint_folder(ckpt_dir)
    path = gguf_file(ckpt_dir)
    if path is not None:
        return path
    if not any(folder.glob("*.pth")):
        if hf.is_hf_dir(folder):
            return folder / "config.json"
        if not (folder / "params.json").exists():
            raise FileNotFoundError(
                f"{str(folder)!r} is neither a Meta checkpoint (params.json and consolidated.NN.pth, as "
                "download.sh writes them) nor a Hugging Face one (config.json and model*.safetensors), and "
                "holds no .gguf file"
            )
    return folder / "params.json"


def open_checkpoint(ckpt_dir: str, rank: int, mp_size: int) -> Tuple[dict, WeightReader]:
    """(params.json's hyper-parameters, a reader of rank's share) for a checkpoint in Meta's layout
    (consolidated.NN.pth), Hugging Face's (config.json and *.safetensors or *.bin) or llama.cpp's (a
    .gguf file, or a folder holding one)."""
    source = params_file(ckpt_dir)
    if source.suffix == ".gguf":
        reader = gguf.GGUFWeightReader(source, rank, mp_size)
        return reader.params(), reader
    if source.name == "config.json":
        params = hf.read_config(source.parent)
        return params, hf.HFReader(source.parent, params, rank, mp_size)
    return read_params(source.parent), ShardReader(shard_paths(source.parent), rank, mp_size)


def model_args(params: dict, vocab_size: int, max_seq_len: int, max_batch_size: int, where: str) -> ModelArgs:
    """ModelArgs from params.json, checked; vocab_size comes from the tokenizer."""
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    unknown = sorted(set(params) - known - {PARAMS_KEY})  # the quantization scheme is read on its own
    if unknown:
        warnings.warn(f"{where}: ignoring unknown keys {unknown}")
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise ValueError(f"{where} lacks {key!r}; it does not describe a Llama model")
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of"):
        if params.get(key) is not None:
            check_int(f"{where}: {key}", params[key])
    for key in ("ffn_dim_multiplier", "norm_eps", "rope_theta"):
        value = params.get(key)
        if value is not None and (not (is_int(value) or isinstance(value, float)) or value <= 0):
            raise ValueError(f"{where}: {key} must be a positive number, got {value!r}")
    args = ModelArgs(**{k: v for k, v in params.items() if k in known and k != "vocab_size"})
    args.vocab_size, args.max_seq_len, args.max_batch_size = vocab_size, max_seq_len, max_batch_size
    if args.dim % args.n_heads or args.n_heads % args.n_kv_heads:
        raise ValueError(
            f"{where}: n_heads={args.n_heads} must divide dim={args.dim} and n_kv_heads={args.n_kv_heads} "
            "must divide n_heads"
        )
    return args


def split_sizes(args: ModelArgs) -> Dict[str, int]:
    """The sizes model parallelism splits: each must be a multiple of the degree."""
    return {
        "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "dim": args.dim,
        "vocabulary size": args.vocab_size, "FFN width": args.ffn_hidden_dim,
    }


def check_degree(args: ModelArgs, mp_size: int) -> None:
    """Raise, naming the degrees that would work, unless `mp_size` splits the model evenly."""
    sizes = split_sizes(args)
    bad = [f"{name} {value}" for name, value in sizes.items() if value % mp_size]
    if bad:
        works = [d for d in range(1, min(sizes.values()) + 1) if all(v % d == 0 for v in sizes.values())]
        raise ValueError(
            f"this model cannot be split over {mp_size} model-parallel processes ({', '.join(bad)} "
            f"not divisible by {mp_size}); degrees that work: {', '.join(map(str, works))}"
        )


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one process's share of the model goes."""

    mp_rank: int  # this process's model-parallel rank
    mp_size: int  # the model-parallel degree
    dtype: torch.dtype
    device: torch.device


def load_model(
    ckpt_dir: str, vocab_size: int, max_seq_len: int, max_batch_size: int, placement: Placement,
    show_progress: bool = True, check_weights: bool = False, quantize: Optional[str] = None,
    group_size: Optional[int] = None,
) -> Transformer:
    """Build the Transformer for model-parallel rank `mp_rank` of `mp_size` on `device`, in `dtype`
    (the placement), with its share of the weights of the checkpoint in `ckpt_dir` (Meta's layout
    with any number of shards, Hugging Face's, or a GGUF file). max_seq_len, max_batch_size: the
    runtime limits the KV cache never grows past. check_weights: also check that every weight is
    finite (a pass over each as it is loaded). quantize ("int8", "int4"), group_size: quantize the
    projections as they load (see llama.quantization); a checkpoint whose params.json declares a
    scheme loads quantized as it is."""
    mp_rank, mp_size, dtype, device = placement.mp_rank, placement.mp_size, placement.dtype, placement.device
    params, reader = open_checkpoint(ckpt_dir, mp_rank, mp_size)
    source = params_file(ckpt_dir)
    folder = source.parent
    declared = declared_scheme(params, str(source))
    args = model_args(params, vocab_size, max_seq_len, max_batch_size, str(source))
    if "tok_embeddings.weight" in reader.keys() and reader.vocab_rows() != vocab_size:
        rows = reader.vocab_rows()
        raise ValueError(_shape_error("tok_embeddings.weight", (rows,), (vocab_size,), vocab_size, source))
    if isinstance(reader, ShardReader):
        reader.check_complete(args.dim)
    check_degree(args, mp_size)
    widths = input_widths(args, mp_size)
    scheme = resolve_scheme(quantize, group_size, declared, widths, str(source), grid_group(reader))
    problem = scheme and quantized_device_problem(scheme.mode, device)
    if problem:
        raise ValueError(problem)
    with torch.device("meta"):
        model = Transformer(args)
    if scheme is not None and declared is None:
        scheme = finer_projections(scheme, reader)
    expected = {k: tuple(p.shape) for k, p in model.state_dict().items()}
    layout = stored_layout(expected, declared)
    available = set(reader.keys())
    missing = [k for k in layout if k not in available]
    if missing:
        files = f"{reader.describe()} in {str(folder)!r}"
        raise ValueError(_missing_error(missing, set(expected), declared, files, source))
    unused = sorted(available - set(layout) - set(UNUSED_KEYS))
    if unused and declared is not None and unused[0].endswith(".zero"):  # a projection declared int8 (no zero)
        raise ValueError(
            f"{reader.describe()} in {str(folder)!r} hold(s) {unused[0]}, which {source.name} declares no place "
            f"for ({declared.describe()}: held in int8, without zeros): the file and {source.name} disagree on how "
            "that projection is stored; write the checkpoint again with python -m llama.quantize"
        )
    if unused:
        raise ValueError(
            f"{reader.describe()} in {str(folder)!r} hold(s) {len(unused)} weight(s) that the model {source.name} "
            f"describes (n_layers={args.n_layers}) does not use, e.g. {unused[:3]}: {source.name} belongs to another "
            "model, or the files hold more than a Llama's weights"
        )
    stored = {}
    for key, (want, integer) in layout.items():
        got = reader.shape(key)
        if got != want:
            raise ValueError(_shape_error(key, got, want, vocab_size, source, reader.describe()))
        stored[key] = reader.dtype(key)
        if not (stored[key] == integer if integer is not None else stored[key].is_floating_point):
            raise ValueError(_dtype_error(key, stored[key], integer, declared, reader.describe(), folder))
    loaded = {}
    for key in tqdm(expected, desc=f"loading {reader.describe()}", unit="tensor", disable=None if show_progress else True):
        if scheme is not None and is_projection(key):
            shard = read_quantized(reader, key, scheme, declared, device, folder if check_weights else None)
            install(model, key, kernel_weight(shard, device))
            continue
        if key == "output.weight" and reader.tied and mp_size == 1:
            loaded[key] = loaded["tok_embeddings.weight"]  # one tensor for both: no second copy
            continue
        loaded[key] = reader.read(key, dtype, device)
        if check_weights:
            check_finite(key, loaded[key], stored[key], folder)
    model.load_state_dict(loaded, assign=True, strict=True)
    model.requires_grad_(False)
    del loaded
    if device.type == "cpu":
        move_weights(model)  # the projections that read one input laid out one after another:
        join_shared_inputs(model)  # each such group is one product from now on
    return model


def stored_layout(expected: Dict[str, Tuple[int, ...]],
                  declared: Optional[Scheme]) -> Dict[str, Tuple[Tuple[int, ...], Optional[torch.dtype]]]:
    """What the checkpoint must hold for a model whose state dict has `expected` shapes: name ->
    (shape, integer dtype of quantized values; None: floating point), with each projection's
    values, scale and zero where params.json declares a quantization scheme."""
    layout = {}
    for key, shape in expected.items():
        if declared is not None and is_projection(key):
            layout.update(stored_tensors(key, shape, declared.for_key(key)))
        else:
            layout[key] = (shape, None)
    return layout


def read_quantized(reader: WeightReader, key: str, scheme: Scheme, declared: Optional[Scheme],
                   device: torch.device, check_in: Optional[Path]) -> QuantizedTensors:
    """This rank's share of projection `key`, quantized: read as stored when the checkpoint declares
    the scheme or stores the weight on the scheme's grids (stored_grids), else quantized from its
    full-precision slice (read as stored, on `device`).
    check_in: the checkpoint folder, to check that the weight (or its scales) are finite."""
    scheme = scheme.for_key(key)
    if declared is not None:
        names = list(stored_tensors(key, reader.shape(key), scheme))
        values, scale, *zero = (reader.read(name) for name in names)
        t = QuantizedTensors(scheme, values, scale, zero[0] if zero else None)
    else:
        names = [key] * 3  # the grids' scales and zeros are named as the weight
        t = stored_grids(reader, key, scheme)
        if t is None:
            weight = reader.read(key, device=device)
            if check_in is not None:
                check_finite(key, weight, weight.dtype, check_in)
            return quantize_shard(key, weight, scheme)
    if check_in is not None:
        for name, part in zip(names[1:], (t.scale, t.zero)):
            if part is not None:
                check_finite(name, part, part.dtype, check_in)
    return t


def grid_group(reader: WeightReader) -> Optional[int]:
    """The group size of the 4-bit grids the checkpoint stores projections on (None: it stores none)."""
    return gguf.GRID_COLUMNS if reader.grid_keys else None


def keeps_grids(scheme: Scheme, reader: WeightReader) -> bool:
    """Whether `scheme` holds the checkpoint's stored 4-bit grids as they are: int4 in groups of theirs."""
    return scheme.mode == "int4" and scheme.group_size == grid_group(reader)


def finer_projections(scheme: Scheme, reader: WeightReader) -> Scheme:
    """`scheme` holding in int8 the projections that int4 in the groups of the checkpoint's 4-bit
    grids (a GGUF file's) would quantize again from more bits: those the file stores otherwise
    (llama.cpp's Q4_K_M files keep attn_v and half of ffn_down in Q6_K, the tensors it finds most
    sensitive; quantized again to 4 bits they make nearly all of an int4 model's difference from
    the file, README), and the projections that read the same input as one of them (input_group:
    a group joined into one product holds one format)."""
    if not keeps_grids(scheme, reader):
        return scheme
    finer = [key for key in reader.keys() if is_projection(key) and key not in reader.grid_keys]
    return dataclasses.replace(scheme, int8=frozenset(k for key in finer for k in input_group(key)))


def stored_grids(reader: WeightReader, key: str, scheme: Scheme) -> Optional[QuantizedTensors]:
    """Projection `key` (this rank's share) with its stored 4-bit grids as they are (from_grids),
    where `scheme` is int4 in groups of theirs and the checkpoint stores it so; else None."""
    if not keeps_grids(scheme, reader):
        return None
    grids = reader.grids(key)
    return None if grids is None else from_grids(*grids)


def check_finite(key: str, tensor: torch.Tensor, stored: torch.dtype, folder: Path) -> None:
    """Raise unless every value of the loaded weight `key` is finite: one pass for its least and
    greatest values (a NaN anywhere makes both NaN), no copy, one wait for the device."""
    low, high = torch.aminmax(tensor)
    if low.isfinite() & high.isfinite():
        return
    narrowed = torch.finfo(tensor.dtype).max < torch.finfo(stored).max
    hint = (f"; or its {stored} values exceed {tensor.dtype}'s range: build with dtype bfloat16 or float32"
            if narrowed else "")
    raise ValueError(
        f"checkpoint tensor {key} in {str(folder)!r} holds NaN or infinite values once loaded as {tensor.dtype}: "
        f"the weights are damaged (by a failed training run or conversion); download them again{hint}"
    )


def _missing_error(missing: List[str], expected: Set[str], declared: Optional[Scheme], files: str, source: Path) -> str:
    """Why the checkpoint lacks tensors `missing` (of the model's `expected` ones, or of a quantized
    weight's scales and zeros), and what to do about it."""
    extra = [k for k in missing if k not in expected]  # scales or zeros of quantized weights
    if declared is not None and extra:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        parts = "scale and zero" if declared.mode == "int4" else "scale"
        return (f"{files} lack(s) {extra[0]}{more}: {source.name} declares weights quantized ({declared.describe()}), "
                f"each with its {parts}; write the checkpoint again with python -m llama.quantize")
    return (f"{files} lack(s) {len(missing)} weight(s), e.g. {missing[:3]}: the files are not a Llama checkpoint, or "
            f"{source.name} belongs to another model")


def _dtype_error(key: str, got: torch.dtype, integer: Optional[torch.dtype], declared: Optional[Scheme],
                 files: str, folder: Path) -> str:
    """Why checkpoint tensor `key`'s dtype `got` is not the one expected (`integer`: a quantized
    weight's; None: floating point), and what to do about it."""
    where = f"checkpoint tensor {key} in {files} in {str(folder)!r}"
    if integer is not None:
        return (f"{where} is {got}, but params.json declares weights quantized ({declared.describe()}), stored as "
                f"{integer}: the file was not written by python -m llama.quantize with this scheme; write it again")
    if declared is None and not got.is_floating_point:
        return (f"{where} is {got}, not floating point: these files do not hold Llama weights as Meta and Hugging "
                "Face store them (bfloat16, float16 or float32), and params.json declares no quantization")
    return (f"{where} is {got}, not floating point: only the projections' values are quantized "
            f"({declared.describe()}); the file is damaged or was not written by python -m llama.quantize")


def _shape_error(key: str, got: tuple, want: tuple, vocab_size: int, source: Path, files: str = "") -> str:
    """Why a checkpoint tensor's shape differs from the model's (whose hyper-parameters come from
    `source`), and what to do about it."""
    if key in ("tok_embeddings.weight", "output.weight") and got[0] != want[0]:
        fix = (f"use the vocabulary that {str(source)!r} carries (leave tokenizer_path out); if it is the one "
               "used, the file is damaged: download it again" if source.suffix == ".gguf" else
               f"pass the tokenizer.model that came with this checkpoint ({str(source.parent / 'tokenizer.model')!r})")
        return f"the checkpoint's vocabulary has {got[0]} tokens but the tokenizer has {vocab_size}: {fix}"
    dim, hint = shard_dim(key, len(want)), ""
    if dim is not None and len(got) == len(want) and 0 < got[dim] < want[dim] and want[dim] % got[dim] == 0 and (
            got[:dim] + got[dim + 1:] == want[:dim] + want[dim + 1:]):
        hint = f"; or shards are missing (the checkpoint has {want[dim] // got[dim]} times as many as {files})"
    return (
        f"checkpoint tensor {key} has shape {got} but {source.name} describes {want}: {source.name} and the "
        f"weights do not belong to the same model{hint}"
    )
