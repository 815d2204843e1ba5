"""A deliberately naive Llama-2 written independently of llama.model, used as the expected answer.

float64, no KV cache, no fairscale: every step recomputes the whole sequence, with the textbook
formulas (complex rotary embeddings on interleaved pairs, repeated K/V heads, an explicit causal
mask). Shards are merged back into full tensors first.
"""

import json
from pathlib import Path
from typing import Dict, List, Tuple

import torch

# Meta's layout: column-parallel weights are split by rows, row-parallel ones and the embedding by columns.
_ROWS = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")
_COLS = ("wo.weight", "w2.weight", "tok_embeddings.weight")


class NaiveLlama:
    def __init__(self, ckpt_dir: Path):
        ckpt_dir = Path(ckpt_dir)
        self.params = json.loads((ckpt_dir / "params.json").read_text())
        shards = [torch.load(p, map_location="cpu") for p in sorted(ckpt_dir.glob("consolidated.*.pth"))]
        self.w: Dict[str, torch.Tensor] = {}
        for key in shards[0]:
            parts = [s[key].double() for s in shards]
            if key.endswith(_ROWS):
                self.w[key] = torch.cat(parts, 0)
            elif key.endswith(_COLS):
                self.w[key] = torch.cat(parts, 1)
            else:
                self.w[key] = parts[0]

    def logits(self, tokens: List[int]) -> torch.Tensor:
        """Logits (T, V) in float64 for every position of one sequence."""
        p, w = self.params, self.w
        n_heads = p["n_heads"]
        n_kv = p.get("n_kv_heads") or n_heads
        hd = p["dim"] // n_heads
        theta = float(p.get("rope_theta", 10000.0))
        T = len(tokens)
        x = w["tok_embeddings.weight"][torch.tensor(tokens)]
        freqs = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        rot = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64), torch.outer(torch.arange(T).double(), freqs))
        mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)

        def norm(v, weight):
            return v / torch.sqrt((v * v).mean(-1, keepdim=True) + p["norm_eps"]) * weight

        def rope(v):  # (T, H, hd)
            c = torch.view_as_complex(v.reshape(T, v.shape[1], hd // 2, 2).contiguous())
            return torch.view_as_real(c * rot[:, None, :]).reshape(T, v.shape[1], hd)

        for i in range(p["n_layers"]):
            a = f"layers.{i}.attention."
            f = f"layers.{i}.feed_forward."
            h = norm(x, w[f"layers.{i}.attention_norm.weight"])
            q = rope((h @ w[a + "wq.weight"].T).view(T, n_heads, hd))
            k = rope((h @ w[a + "wk.weight"].T).view(T, n_kv, hd))
            v = (h @ w[a + "wv.weight"].T).view(T, n_kv, hd)
            k = k.repeat_interleave(n_heads // n_kv, dim=1)
            v = v.repeat_interleave(n_heads // n_kv, dim=1)
            scores = torch.einsum("thd,shd->hts", q, k) / hd**0.5 + mask
            att = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, -1)
            x = x + att @ w[a + "wo.weight"].T
            h = norm(x, w[f"layers.{i}.ffn_norm.weight"])
            gate = h @ w[f + "w1.weight"].T
            x = x + (gate * torch.sigmoid(gate) * (h @ w[f + "w3.weight"].T)) @ w[f + "w2.weight"].T
        return norm(x, w["norm.weight"]) @ w["output.weight"].T

    def greedy(self, prompt: List[int], max_gen_len: int, stop_ids=(), max_seq_len=10**9) -> Tuple[List[int], List[float]]:
        """Greedy continuation of one prompt and the log-probability of each new token."""
        tokens, out, lps = list(prompt), [], []
        for _ in range(min(max_gen_len, max_seq_len - len(prompt))):
            logp = torch.log_softmax(self.logits(tokens)[-1], -1)
            t = int(logp.argmax())
            if t in stop_ids:
                break
            out.append(t)
            lps.append(float(logp[t]))
            tokens.append(t)
        return out, lps

    def prompt_logprobs(self, prompt: List[int]) -> List[float]:
        """0.0 for the first token, then log p(token | the tokens before it)."""
        logp = torch.log_softmax(self.logits(prompt), -1)
        return [0.0] + [float(logp[j, prompt[j + 1]]) for j in range(len(prompt) - 1)]
