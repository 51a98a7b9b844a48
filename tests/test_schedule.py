"""The learning-rate schedule shared by the three learning rates."""
import math

import pytest

from scalebio.schedule import lr_factor


def test_warmup_then_cosine_to_zero():
    total = 100
    f = [lr_factor(s, total, 0.03, "cosine") for s in range(total)]
    assert f[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # 3% of 100 steps of linear warmup
    assert f[3] == pytest.approx(1.0)
    assert f[3 + 97 // 2] == pytest.approx(0.5 * (1 + math.cos(math.pi * (97 // 2) / 97)))
    assert all(a >= b for a, b in zip(f[3:], f[4:]))
    assert f[-1] < 0.001


def test_linear_constant_and_floor():
    assert lr_factor(50, 100, 0.0, "linear") == pytest.approx(0.5)
    assert lr_factor(99, 100, 0.1, "constant") == 1.0
    assert lr_factor(10_000, 100, 0.0, "cosine", min_ratio=0.1) == pytest.approx(0.1)
