"""Write a copy of a checkpoint split for another model-parallel degree.

    python -m llama.reshard SRC_DIR DST_DIR --mp M

DST_DIR gets M consolidated.NN.pth shards (same dtype as the source), params.json,
tokenizer.model and a fresh checklist.chk. Tensors are read one at a time from the memory-mapped
source; memory use peaks at about one output shard.
"""

import argparse
import hashlib
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from llama.checkpoint import ShardReader, check_degree, model_args, read_params, shard_paths


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def write_checklist(folder: Path) -> None:
    """checklist.chk in md5sum's format, as Meta's downloads carry it."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "checklist.chk")
    (folder / "checklist.chk").write_text("".join(f"{md5sum(p)}  {p.name}\n" for p in files))


def reshard(src: str, dst: str, mp: int, show_progress: bool = True) -> Path:
    """Write the checkpoint in `src` as `mp` shards into `dst`; returns dst."""
    src_dir, dst_dir = Path(src), Path(dst)
    paths = shard_paths(src_dir)
    if dst_dir.resolve() == src_dir.resolve():
        raise ValueError("DST_DIR must differ from SRC_DIR")
    if dst_dir.exists() and any(dst_dir.glob("*.pth")):
        raise FileExistsError(f"{dst_dir} already holds .pth files; pass an empty or new folder")
    first = ShardReader(paths, 0, mp)
    vocab = first.stored_shape("tok_embeddings.weight")[0]  # split by columns: all rows in every shard
    check_degree(model_args(read_params(src_dir), vocab, 1, 1, str(src_dir / "params.json")), mp)
    dst_dir.mkdir(parents=True, exist_ok=True)
    keys = first.keys()
    with tqdm(total=mp * len(keys), unit="tensor", desc=f"{len(paths)} -> {mp} shards", disable=None if show_progress else True) as bar:
        for rank in range(mp):
            reader = first if rank == 0 else ShardReader(paths, rank, mp)
            shard = {}
            for key in keys:
                shard[key] = reader.read(key).clone()  # compact storage: save writes just this tensor
                bar.update()
            torch.save(shard, dst_dir / f"consolidated.{rank:02d}.pth")
            del shard, reader
    for name in ("params.json", "tokenizer.model"):
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, dst_dir / name)
    write_checklist(dst_dir)
    return dst_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llama.reshard", description=__doc__.split("\n\n")[0])
    parser.add_argument("src_dir", help="checkpoint folder (params.json, consolidated.NN.pth)")
    parser.add_argument("dst_dir", help="folder to write (created if missing)")
    parser.add_argument("--mp", type=int, required=True, help="model-parallel degree of the copy")
    a = parser.parse_args(argv)
    try:
        out = reshard(a.src_dir, a.dst_dir, a.mp)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        parser.error(str(e))
    print(f"wrote {a.mp} shard(s) to {out}")


if __name__ == "__main__":
    main()
