"""Write a copy of a checkpoint split for another model-parallel degree, in Meta's layout.

    python -m llama.reshard SRC_DIR DST_DIR --mp M

SRC_DIR is a checkpoint in Meta's layout (any number of shards) or in Hugging Face's. DST_DIR gets
M consolidated.NN.pth shards (same dtype as the source), params.json, tokenizer.model and a fresh
checklist.chk. Tensors are read one at a time from the memory-mapped
source; memory use peaks at about one output shard.
"""

import argparse
import json
from pathlib import Path
from typing import Callable, Dict

import torch
from tqdm import tqdm

from llama.cli import reports_user_errors
from llama.files import copy_if_present, refuse_output_files, write_checklist
from llama.loading import check_degree, model_args, open_checkpoint, resolve_checkpoint


def compact(key: str, tensor: torch.Tensor) -> Dict[str, torch.Tensor]:
    """{key: a copy of tensor in storage of its own}: torch.save then writes just this tensor, not
    the whole mapped shard it is a view of."""
    return {key: tensor.clone()}


def write_shards(src: str, dst_dir: Path, mp: int, desc: str, show_progress: bool = True,
                 convert: Callable[[str, torch.Tensor], Dict[str, torch.Tensor]] = compact) -> None:
    """Write the checkpoint in `src` split for `mp` ranks as consolidated.NN.pth shards in `dst_dir`,
    one output shard in memory at a time: each rank's part of each tensor, read from the
    memory-mapped source, is stored as `convert(key, part)` (the tensors to save under their names)."""
    first = open_checkpoint(src, 0, mp)[1]
    keys = first.keys()
    with tqdm(total=mp * len(keys), unit="tensor", desc=desc, disable=None if show_progress else True) as bar:
        for rank in range(mp):
            reader = first if rank == 0 else open_checkpoint(src, rank, mp)[1]
            shard = {}
            for key in keys:
                shard.update(convert(key, reader.read(key)))
                bar.update()
            torch.save(shard, dst_dir / f"consolidated.{rank:02d}.pth")
            del shard, reader


def reshard(src: str, dst: str, mp: int, show_progress: bool = True) -> Path:
    """Write the checkpoint in `src` (Meta's layout with any number of shards, or Hugging Face's)
    as `mp` consolidated.NN.pth shards in Meta's layout into `dst`; returns dst."""
    src = resolve_checkpoint(src)
    src_dir, dst_dir = Path(src), Path(dst)
    params, first = open_checkpoint(src, 0, mp)
    if dst_dir.exists() and dst_dir.resolve() == src_dir.resolve():
        raise ValueError("DST_DIR must differ from SRC_DIR")
    refuse_output_files(dst_dir, ".pth")
    check_degree(model_args(params, first.vocab_rows(), 1, 1, str(src_dir)), mp)
    dst_dir.mkdir(parents=True, exist_ok=True)
    write_shards(src, dst_dir, mp, f"{first.describe()} -> {mp} shard(s)", show_progress)
    if not copy_if_present(src_dir, dst_dir, "params.json"):
        (dst_dir / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    copy_if_present(src_dir, dst_dir, "tokenizer.model")
    write_checklist(dst_dir)
    return dst_dir


@reports_user_errors("python -m llama.reshard")
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llama.reshard", description=__doc__.split("\n\n")[0])
    parser.add_argument("src_dir", help="checkpoint folder (Meta's or Hugging Face's layout)")
    parser.add_argument("dst_dir", help="folder to write (created if missing)")
    parser.add_argument("--mp", type=int, required=True, help="model-parallel degree of the copy")
    a = parser.parse_args(argv)
    out = reshard(a.src_dir, a.dst_dir, a.mp)
    print(f"wrote {a.mp} shard(s) to {out}")


if __name__ == "__main__":
    main()
