"""A CPU model's weights moved into transparent huge pages (llama/huge_pages.py): the same values,
ties kept, quantized weights' tensors included, huge pages really backing them where the system
gives them, and nothing done where it does not."""

import torch
from torch import nn

from llama import huge_pages
from llama.kernels import QuantizedWeight


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Linear(512, 2048, bias=False)
        self.embed.weight.data = torch.randn(2048, 512, generator=g)  # 4 MiB
        self.out = nn.Linear(512, 2048, bias=False)
        self.out.weight = self.embed.weight  # tied, as SmolLM2's output is to its embedding
        self.q = nn.Module()
        self.q.weight = QuantizedWeight("int8", torch.randint(-127, 128, (1024, 512), dtype=torch.int8, generator=g),
                                        torch.rand(1024, generator=g).bfloat16(), 512, (1024, 512))
        self.norm = nn.Parameter(torch.rand(512, generator=g), requires_grad=False)


def anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds `address` (from /proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            inside = lo <= address < hi
        elif inside and fields[0] == "AnonHugePages:":
            return int(fields[1])
    return 0


def test_moved_weights_keep_values_ties_and_live_in_huge_pages():
    model = Tied()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    data, scales = model.q.weight.data.clone(), model.q.weight.scales.clone()
    moved = huge_pages.move_weights(model)
    if not huge_pages.available():
        assert moved == 0
        return
    assert moved >= 4 * 2**20 + 512 * 1024
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name
    assert torch.equal(model.q.weight.data, data) and torch.equal(model.q.weight.scales, scales)
    assert model.out.weight.data_ptr() == model.embed.weight.data_ptr()  # still one tensor
    ptrs = [model.embed.weight.data_ptr(), model.q.weight.data.data_ptr(), model.norm.data_ptr()]
    assert min(ptrs) % huge_pages.HUGE_PAGE == 0  # the first starts a huge page
    assert max(ptrs) - min(ptrs) < moved  # one mapping
    assert anon_huge_kib(model.embed.weight.data_ptr()) >= 2048  # the 4 MiB table sits in huge pages


def test_nothing_is_done_where_huge_pages_are_not_given(monkeypatch):
    monkeypatch.setattr(huge_pages, "available", lambda: False)
    model = Tied()
    ptr = model.embed.weight.data_ptr()
    assert huge_pages.move_weights(model) == 0
    assert model.embed.weight.data_ptr() == ptr


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("LLAMA_HUGE_PAGES", "0")
    assert not huge_pages.available()
    model = Tied()
    ptr = model.embed.weight.data_ptr()
    assert huge_pages.move_weights(model) == 0 and model.embed.weight.data_ptr() == ptr
