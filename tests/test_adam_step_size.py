"""The Adam step-size diagnostic: drift per head, group and learning rate."""

import torch

from benchmarks.search import adam_step_size
from pml_crt.models import CRT


def test_measure_and_markdown_on_a_small_map():
    heads = {
        "plain": lambda c: CRT(c, 8, 4, global_pooling=None),
        "scaled": lambda c: CRT(c, 8, 4, scale_fusion_step=True, global_pooling=None),
    }
    drifts = adam_step_size.measure([0, 1], [1e-3], steps=1, channels=6, heads=heads)
    assert set(drifts) == {(h, g, 1e-3) for h in heads for g in adam_step_size.GROUPS}
    assert all(len(v) == 2 and all(0 <= d <= 2 for d in v) for v in drifts.values())
    # One Adam step moves a step-scaled fusion's weights K = 4 times less: less drift.
    for seed in range(2):
        assert drifts[("scaled", "fuse", 1e-3)][seed] < drifts[("plain", "fuse", 1e-3)][seed]
    # Groups other than the fusion are the same module and the same step in both heads.
    torch.testing.assert_close(
        torch.tensor(drifts[("scaled", "projection", 1e-3)]),
        torch.tensor(drifts[("plain", "projection", 1e-3)]),
        rtol=1e-4,
        atol=1e-7,
    )
    text = adam_step_size.markdown(drifts, [1e-3], [0, 1], 1, 6, "cmd")
    assert "| plain | fuse |" in text and "| scaled | prototypes |" in text
    assert "seeds [0, 1]" in text and "Command: `cmd`" in text


def test_a_head_without_a_group_skips_it():
    heads = {"linear": adam_step_size.HEADS["linear (avg pool + Linear)"]}
    drifts = adam_step_size.measure([0], [1e-4], steps=1, channels=5, heads=heads)
    assert {g for _, g, _ in drifts} == {"all"}
