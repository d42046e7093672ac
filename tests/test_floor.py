"""``sfumato.floor``: layer types of op names, the attention FLOP formula, the floor arithmetic, and a
profile of a small UNet whose convolution and attention FLOPs are counted by hand here."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sfumato.floor import CATEGORIES, category, floor_report, matmul_peaks, step_profile


def test_categories():
    names = {"aten::mkldnn_convolution": "conv", "aten.convolution.default": "conv", "aten::addmm": "linear",
             "aten.mm.default": "linear", "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
             "aten::bmm": "linear", "aten::native_group_norm": "norm", "aten::native_layer_norm": "norm",
             "aten::add": "other", "aten::gelu": "other", "aten::upsample_nearest2d": "other"}
    for op, want in names.items():
        assert category(op) == want, op


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.proj = nn.Linear(16, 48)

    def forward(self, x):
        h = self.norm(self.conv(x))                               # (1, 16, 8, 8)
        tokens = h.flatten(2).transpose(1, 2)                      # (1, 64, 16)
        q, k, v = self.proj(tokens).view(1, 64, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v)


def test_profile_counts_each_layer_type():
    block, x = _Block().eval(), torch.randn(1, 8, 8, 8)
    prof = step_profile(lambda: block(x))
    assert set(prof) == set(CATEGORIES)
    assert prof["conv"]["flops"] == 2 * 16 * 8 * 9 * 64                  # 2·out·in·k²·positions
    assert prof["linear"]["flops"] == 2 * 64 * 16 * 48
    assert prof["attention"]["flops"] == 4 * 2 * 64 * 64 * 8             # 4·(B·H)·N·M·d
    assert all(prof[c]["seconds"] > 0 for c in ("conv", "linear", "attention", "norm"))


def test_floor_arithmetic():
    prof = {c: {"flops": 0.0, "seconds": 0.0} for c in CATEGORIES}
    prof["conv"] = {"flops": 6e9, "seconds": 0.1}
    prof["linear"] = {"flops": 4e9, "seconds": 0.1}
    report = floor_report(prof, peak_gflops=100.0, step_seconds=0.2)
    assert report["conv"]["gflops"] == 60.0 and report["conv"]["of_floor"] == 0.6
    assert report["step"]["floor_seconds"] == 0.1 and report["step"]["of_floor"] == 0.5
    assert report["norm"]["of_floor"] is None


def test_peaks_are_measured(monkeypatch):
    """The rate is the work over the best run's time: with a fake clock where each call takes 2 ms
    except one 1 ms call, 2·m·k·n FLOPs come out at exactly work / 1 ms, per dtype and shape."""
    from sfumato import floor

    durations = iter([0.002, 0.002, 0.001] + [0.002] * 10_000)
    now = [0.0]

    class Clock:
        calls = 0

        @staticmethod
        def perf_counter():
            Clock.calls += 1
            if Clock.calls % 2 == 0:   # a call's end: advance by its duration
                now[0] += next(durations)
            return now[0]

    monkeypatch.setattr(floor, "time", Clock)
    peaks = matmul_peaks(shapes=((64, 32, 16),))
    assert peaks["fp32"] == pytest.approx(2.0 * 64 * 32 * 16 / 0.001 / 1e9)
    for name in ("bf16", "int8"):   # later dtypes: the fake clock's 2 ms calls only
        if name in peaks:
            assert peaks[name] == pytest.approx(2.0 * 64 * 32 * 16 / 0.002 / 1e9)
