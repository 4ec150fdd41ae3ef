"""``scale_fusion_step`` through optimizer parameter groups (``pml_crt.utils.param_groups``)."""

from __future__ import annotations

import pytest
import torch

from pml_crt.models import CRT, GlobalPoolEmbedder, MultiHeadCRT
from pml_crt.utils import param_groups

# The fusion's mechanics are checked on heads without a global branch, whose fusion does not
# start at zero (with a branch it does, and the fused values would all be 0).
HEAD = {"projection_dim": 5, "global_pooling": None}


def _ids(parameters):
    return {id(p) for p in parameters}


def test_groups_put_each_scaled_fusion_at_its_rate_and_options_in_every_group():
    model = MultiHeadCRT(6, heads=[(4, 8), (2, 4)], projection_dim=5, scale_fusion_step=True)
    groups = param_groups(model, lr=1e-3, weight_decay=1e-4, betas=(0.8, 0.9))
    by_lr = {group["lr"]: group for group in groups}
    assert sorted(by_lr) == pytest.approx([1e-3 / 4, 1e-3 / 2, 1e-3])
    assert _ids(by_lr[1e-3 / 4]["params"]) == _ids(model.heads[0].fuse.parameters())
    assert _ids(by_lr[1e-3 / 2]["params"]) == _ids(model.heads[1].fuse.parameters())
    fused = _ids(model.heads[0].fuse.parameters()) | _ids(model.heads[1].fuse.parameters())
    assert _ids(groups[0]["params"]) == _ids(model.parameters()) - fused
    assert groups[0]["lr"] == 1e-3
    assert all(g["weight_decay"] == 1e-4 and g["betas"] == (0.8, 0.9) for g in groups)


def test_only_the_flatten_fusion_is_scaled_and_frozen_parameters_are_left_out():
    for fusion in ("sum", "prototype_wise"):
        crt = CRT(6, embedding_size=8, num_prototypes=4, fusion=fusion, scale_fusion_step=True)
        assert crt.fusion_lr_scale == 1.0
        assert len(param_groups(crt, lr=0.1)) == 1
    plain = GlobalPoolEmbedder(6, 4)
    plain.linear.weight.requires_grad_(False)
    (group,) = param_groups(plain, lr=0.1)
    assert _ids(group["params"]) == {id(plain.linear.bias)}
    crt = CRT(6, 8, 4, scale_fusion_step=True)
    crt.fuse.requires_grad_(False)
    assert len(param_groups(crt, lr=0.1)) == 1, "an empty fusion group was kept"
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got 0"):
        param_groups(crt, lr=0)


def test_coupled_weight_decay_means_the_same_for_the_scaled_fusion():
    # Adam(weight_decay=wd) on param_groups must equal a hand-built optimizer that gives a
    # plain CRT's fusion lr / K with the same wd: the fusion's decay is wd, as for every
    # other layer (0.1.0's in-module step scaling turned a coupled wd into K^2 wd).
    x = torch.randn(8, 6, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(8) % 4
    lr, wd, k = 1e-2, 1e-1, 4
    models = []
    for scaled in (True, False):
        torch.manual_seed(0)
        models.append(CRT(6, 8, k, **HEAD, scale_fusion_step=scaled).double())
    scaled_model, plain_model = models
    fuse = _ids(plain_model.fuse.parameters())
    by_hand = torch.optim.Adam(
        [
            {"params": [p for p in plain_model.parameters() if id(p) not in fuse]},
            {"params": list(plain_model.fuse.parameters()), "lr": lr / k},
        ],
        lr=lr,
        weight_decay=wd,
    )
    grouped = torch.optim.Adam(param_groups(scaled_model, lr=lr), weight_decay=wd)
    for model, optimizer in ((scaled_model, grouped), (plain_model, by_hand)):
        for _ in range(3):
            optimizer.zero_grad()
            embeddings = torch.nn.functional.normalize(model(x), dim=1)
            same = labels[:, None] == labels[None, :]
            (embeddings @ embeddings.t())[~same].exp().sum().log().backward()
            optimizer.step()
    for (name, got), expected in zip(
        scaled_model.state_dict().items(), plain_model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=name)
    # And the fusion really moved by about lr / K per step, not lr: an Adam step moves a
    # weight by at most about lr (exactly lr on the first), so 3 steps by <= ~3 lr / K.
    torch.manual_seed(0)
    start = CRT(6, 8, k, **HEAD).double().fuse.weight.detach()
    moved = float((scaled_model.fuse.weight.detach() - start).abs().max())
    assert 0.5 * lr / k < moved <= 3.5 * lr / k


@pytest.mark.parametrize("cls", ["CRT", "MultiHeadCRT"])
def test_state_dicts_load_both_ways_as_the_same_function(cls):
    def build(scaled):
        torch.manual_seed(0)
        if cls == "CRT":
            return CRT(6, 8, 4, **HEAD, scale_fusion_step=scaled).double()
        return MultiHeadCRT(
            6, heads=[(4, 8), (2, 4)], global_pooling=None, scale_fusion_step=scaled
        ).double()

    x = torch.randn(3, 6, 2, 2, dtype=torch.float64)
    for source, target in ((True, False), (False, True)):
        saved, loaded = build(source), build(target)
        for parameter in loaded.parameters():
            torch.nn.init.normal_(parameter.data)  # so that loading must change it
        loaded.load_state_dict(saved.state_dict())
        torch.testing.assert_close(loaded(x), saved(x), rtol=0, atol=0)


def test_a_checkpoint_of_the_old_step_scaled_fusion_loads_as_its_function():
    # pml-crt 0.1.0 stored the fusion y = (1/K) (x V^T + c) as fuse.scaled_weight = V and
    # fuse.scaled_bias = c: it loads as the Linear with weight V / K and bias c / K.
    torch.manual_seed(0)
    crt = CRT(6, 8, 4, **HEAD, scale_fusion_step=True).double()
    state = crt.state_dict()
    state["fuse.scaled_weight"] = 4 * state.pop("fuse.weight")
    state["fuse.scaled_bias"] = 4 * state.pop("fuse.bias")
    expected = crt(torch.ones(1, 6, 2, 2, dtype=torch.float64))
    fresh = CRT(6, 8, 4, **HEAD).double()
    fresh.load_state_dict(state)
    got = fresh(torch.ones(1, 6, 2, 2, dtype=torch.float64))
    torch.testing.assert_close(got, expected, rtol=1e-15, atol=1e-15)


def test_the_fusion_weight_is_a_parameter_that_in_place_edits_reach():
    crt = CRT(6, 8, 4, **HEAD, scale_fusion_step=True)
    crt.fuse.weight.data.zero_()
    crt.fuse.bias.data.zero_()
    assert float(crt(torch.randn(2, 6, 3, 3)).abs().max()) == 0.0
    with pytest.raises(TypeError, match="scale_fusion_step must be a bool, got int"):
        CRT(6, 8, 4, scale_fusion_step=1)
