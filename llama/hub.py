"""Hugging Face hub ids as checkpoints: `Llama.build("codellama/CodeLlama-7b-hf")`.

A `ckpt_dir` that is not an existing file or folder and has the shape of a hub id is fetched with
huggingface_hub (the optional extra `pip install 'codellama[hub]'`) into its cache, and the local
copy is what gets loaded. The forms:

    owner/name                  the checkpoint at the head of the main branch
    owner/name@revision         at a branch, tag or commit
    owner/name/FILE.gguf        one GGUF file of a repository that holds several (also @revision)

Only what a checkpoint needs is downloaded, chosen from the repository's file list: Meta's layout
(params.json, consolidated.NN.pth, tokenizer.model), else Hugging Face's (config.json, the
*.safetensors with their index, or else the older pytorch_model*.bin, and the tokenizer and
generation files beside them), else a single .gguf file. Everything else huggingface_hub decides
as it always does: the cache folder (HF_HUB_CACHE, or HF_HOME/hub), offline mode (HF_HUB_OFFLINE=1:
the cache only), the token of a gated or private repository (HF_TOKEN, or `hf auth login`), file
locks when several processes (torchrun's ranks) fetch the same files at once.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from llama.checks import MissingExtra

# owner/name, an optional /path/FILE.gguf inside the repository, an optional @revision.
HUB_ID = re.compile(
    r"(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95})"
    r"(?:/(?P<file>[^@]+\.gguf))?(?:@(?P<revision>[^@\s]+))?"
)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")
CONFIG_FILES = ("params.json", "config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json")
INSTALL = "pip install 'codellama[hub]'"
# A missing "folder/consolidated.00.pth" is a mistyped local path, not a repository of that name.
FILE_SUFFIXES = (".pth", ".json", ".model", ".safetensors", ".bin", ".gguf", ".chk")


@dataclass(frozen=True)
class HubId:
    repo: str  # owner/name
    file: Optional[str] = None  # a .gguf file inside the repository
    revision: Optional[str] = None  # None: the main branch

    def __str__(self) -> str:
        return self.repo + (f"/{self.file}" if self.file else "") + (f"@{self.revision}" if self.revision else "")


def parse(ckpt_dir: str) -> Optional[HubId]:
    """The hub id `ckpt_dir` names, or None: an existing path, or something of another shape (an
    absolute or ./ path, a single name, a Windows path) is always local."""
    if Path(ckpt_dir).expanduser().exists() or ckpt_dir.startswith((".", "/", "~")) or "\\" in ckpt_dir:
        return None
    m = HUB_ID.fullmatch(ckpt_dir)
    if m is None or "--" in m["repo"] or ".." in m["repo"] or m["repo"].endswith((".git", ".") + FILE_SUFFIXES):
        return None
    return HubId(m["repo"], m["file"], m["revision"])


def resolve(ckpt_dir: str, weights: bool = True) -> str:
    """The local path of the checkpoint `ckpt_dir` names: `ckpt_dir` itself, or, for a hub id, its
    copy in huggingface_hub's cache (downloaded if needed: a folder, or the .gguf file). weights:
    False fetches only the hyper-parameters and tokenizer (python -m llama.memory)."""
    hub_id = parse(str(ckpt_dir))
    if hub_id is None:
        return str(ckpt_dir)
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise MissingExtra(
            f"{str(ckpt_dir)!r} is not a local file or folder; as a Hugging Face hub id it needs huggingface_hub: "
            f"{INSTALL}"
        ) from None
    errors = _errors(huggingface_hub)
    offline = bool(constants.HF_HUB_OFFLINE)
    why_local = "HF_HUB_OFFLINE is set" if offline else None
    names = None
    if not offline:
        try:
            names = huggingface_hub.HfApi().list_repo_files(hub_id.repo, revision=hub_id.revision)
        except errors.GatedRepoError:
            raise _gated(hub_id) from None
        except errors.RepositoryNotFoundError:
            raise FileNotFoundError(
                f"{str(ckpt_dir)!r} is neither a local file or folder nor a model on the Hugging Face hub (if it is a "
                "private or gated model, log in with `hf auth login` or set HF_TOKEN)"
            ) from None
        except errors.RevisionNotFoundError:
            raise FileNotFoundError(
                f"the Hugging Face model {hub_id.repo!r} has no revision {hub_id.revision!r}") from None
        except Exception as e:  # no network, the hub down: the cache may have it, as huggingface_hub itself does
            why_local = f"the hub could not be reached ({type(e).__name__}: {e})"
    if names is None:
        names = _cached_names(huggingface_hub, hub_id)
    patterns = None if names is None else checkpoint_files(hub_id, names, weights)
    try:
        folder = Path(huggingface_hub.snapshot_download(
            hub_id.repo, revision=hub_id.revision, allow_patterns=patterns, local_files_only=why_local is not None))
    except errors.GatedRepoError:
        raise _gated(hub_id) from None
    except errors.LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{str(hub_id)!r} is not in the Hugging Face cache {constants.HF_HUB_CACHE} (or only in part) and "
            f"{why_local or 'it could not be downloaded'}: run once with network access (HF_HUB_OFFLINE unset) "
            f"to download it, or `{download_command(hub_id)}`; if it is cached elsewhere, point HF_HUB_CACHE (or "
            "HF_HOME) there"
        ) from None
    if hub_id.file is not None or (patterns is not None and len(patterns) == 1 and patterns[0].endswith(".gguf")):
        path = folder / (hub_id.file or patterns[0])
        if not path.is_file():
            raise FileNotFoundError(f"{str(hub_id)!r}: {path.name} is not in the cached copy {folder}")
        return str(path)
    return str(folder)


def checkpoint_files(hub_id: HubId, names: List[str], weights: bool = True) -> List[str]:
    """The files of a repository (`names`: its file list) that make its checkpoint: Meta's layout,
    else Hugging Face's (safetensors, else pytorch_model*.bin), else its one .gguf file. Only files
    at the top of the repository count (Meta's copy in an original/ folder is not fetched twice)."""
    top = [n for n in names if "/" not in n]
    ggufs = sorted(n for n in names if n.endswith(".gguf"))
    if hub_id.file is not None:
        if hub_id.file not in names:
            listed = f"its GGUF files: {', '.join(ggufs[:8])}" if ggufs else "it holds no GGUF file"
            raise FileNotFoundError(f"the Hugging Face model {hub_id.repo!r} has no file {hub_id.file!r} ({listed})")
        return [hub_id.file]
    extra = [n for n in top if n in TOKENIZER_FILES]
    meta = [n for n in top if re.fullmatch(r"consolidated\.\d+\.pth", n)]
    safetensors = [n for n in top if n.endswith(".safetensors") or n == "model.safetensors.index.json"]
    bins = [n for n in top if re.fullmatch(r"pytorch_model.*\.bin", n) or n == "pytorch_model.bin.index.json"]
    if "params.json" in top and meta:
        chosen = ["params.json"] + meta
    elif "config.json" in top and (safetensors or bins):
        chosen = ["config.json"] + (safetensors or bins)
    elif len(ggufs) == 1:
        return ggufs
    elif ggufs:
        shown = ", ".join(ggufs[:8]) + (f" and {len(ggufs) - 8} more" if len(ggufs) > 8 else "")
        raise ValueError(
            f"the Hugging Face model {hub_id.repo!r} holds {len(ggufs)} GGUF files ({shown}): name the one to load, "
            f"e.g. {hub_id.repo}/{ggufs[0]}"
        )
    else:
        raise ValueError(
            f"the Hugging Face model {hub_id.repo!r} holds no checkpoint this package loads (Meta's params.json and "
            "consolidated.NN.pth, Hugging Face's config.json and *.safetensors, or a .gguf file); its files: "
            f"{', '.join(sorted(names)[:10]) or 'none'}"
        )
    if not weights:
        return [n for n in top if n in CONFIG_FILES]
    return chosen + extra


def download_command(hub_id: HubId) -> str:
    """huggingface_hub's command line that fills the cache with `hub_id`."""
    return " ".join(["hf download", hub_id.repo] + ([hub_id.file] if hub_id.file else []) +
                    ([f"--revision {hub_id.revision}"] if hub_id.revision else []))


def _cached_names(huggingface_hub, hub_id: HubId) -> Optional[List[str]]:
    """The file list huggingface_hub cached with an earlier download of this revision (recent
    versions keep it), so that the offline cache is checked for the same files; None if unknown."""
    get_tree = getattr(huggingface_hub, "get_cached_repo_tree", None)
    if get_tree is None:
        return None
    try:
        return [f.path for f in get_tree(hub_id.repo, revision=hub_id.revision)]
    except Exception:  # no listing cached: the snapshot folder is taken as it is
        return None


def _gated(hub_id: HubId) -> PermissionError:
    return PermissionError(
        f"the Hugging Face model {hub_id.repo!r} is gated: accept its terms on https://huggingface.co/{hub_id.repo}, "
        "then log in with `hf auth login` or set HF_TOKEN to a token of that account"
    )


def _errors(huggingface_hub):
    """huggingface_hub's error classes (in huggingface_hub.errors since 0.23, utils before)."""
    try:
        from huggingface_hub import errors
    except ImportError:  # pragma: no cover - older huggingface_hub
        from huggingface_hub import utils as errors
    return errors
