"""Feature-map trunks: shapes, agreement with torchvision, freezing, offline pretrained loading."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torchvision

from pml_crt.models import CRT
from pml_crt.trunks import FeatureMapTrunk, SmallConvNet, available_trunks, feature_map_trunk

WEIGHTS_FILE = (
    Path(__file__).resolve().parents[2] / "shared" / "weights" / "mobilenet_v2-b0353104.pth"
)

EXPECTED_CHANNELS = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet101": 2048,
    "resnet152": 2048,
    "googlenet": 1024,
    "mobilenet_v2": 1280,
}


def _batchnorms(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in module.named_buffers()}


def test_registry_lists_the_required_architectures():
    assert set(EXPECTED_CHANNELS) == set(available_trunks())


@pytest.mark.parametrize("name", sorted(EXPECTED_CHANNELS))
def test_output_shape_and_out_channels(name):
    # Built and run on the meta device: shapes without the cost of init and compute.
    with torch.device("meta"):
        trunk = feature_map_trunk(name).eval()
        out = trunk(torch.empty(2, 3, 64, 64))
    assert isinstance(trunk, FeatureMapTrunk)
    assert trunk.out_channels == EXPECTED_CHANNELS[name]
    assert trunk.stride == 32
    assert trunk.weights is None
    assert out.shape == (2, EXPECTED_CHANNELS[name], 2, 2)


def test_resnet50_real_forward_is_finite():
    # resnet18, googlenet and mobilenet_v2 run for real in the tests below.
    name = "resnet50"
    torch.manual_seed(0)
    trunk = feature_map_trunk(name).eval()
    with torch.no_grad():
        out = trunk(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, EXPECTED_CHANNELS[name], 2, 2)
    assert torch.isfinite(out).all()


def test_feature_map_side_is_input_over_32():
    trunk = feature_map_trunk("resnet18").eval()
    with torch.no_grad():
        assert trunk(torch.randn(1, 3, 224, 224)).shape == (1, 512, 7, 7)
        assert trunk(torch.randn(1, 3, 96, 128)).shape == (1, 512, 3, 4)


def _head(name: str, model: torch.nn.Module, feature_map: torch.Tensor) -> torch.Tensor:
    pooled = torch.nn.functional.adaptive_avg_pool2d(feature_map, 1).flatten(1)
    return model.classifier(pooled) if name == "mobilenet_v2" else model.fc(pooled)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("resnet18", {}),
        ("googlenet", {"aux_logits": False, "init_weights": False, "transform_input": True}),
        ("mobilenet_v2", {}),
    ],
)
def test_trunk_equals_torchvision_forward_before_pooling(name, kwargs):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs).eval()
    trunk = FeatureMapTrunk(name, model=model).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        actual = _head(name, model, trunk(x))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_trunk_feeds_a_crt_embedder():
    trunk = feature_map_trunk("resnet18")
    embedder = CRT(trunk.out_channels, embedding_size=16, num_prototypes=4)
    embeddings = embedder(trunk(torch.randn(3, 3, 64, 64)))
    assert embeddings.shape == (3, 16)
    embeddings.sum().backward()
    assert trunk.body.stem.conv1.weight.grad is not None


def test_freeze_batchnorm_keeps_statistics_and_has_no_grad():
    torch.manual_seed(0)
    trunk = feature_map_trunk("resnet18", freeze_batchnorm=True)
    trunk.train()
    assert trunk.training
    bns = _batchnorms(trunk)
    assert bns and all(not bn.training for bn in bns)
    assert all(not p.requires_grad for bn in bns for p in bn.parameters())
    assert trunk.body.stem.conv1.weight.requires_grad

    before = _buffers(trunk)
    trunk(torch.randn(4, 3, 32, 32) * 3 + 1).sum().backward()
    after = _buffers(trunk)
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)
    assert all(p.grad is None for bn in bns for p in bn.parameters())
    assert trunk.body.layer4[0].conv1.weight.grad is not None

    # the BatchNorms stay frozen through eval() -> train() round trips
    trunk.eval().train()
    assert all(not bn.training for bn in _batchnorms(trunk))


def test_without_freeze_batchnorm_statistics_change():
    trunk = feature_map_trunk("resnet18").train()
    before = _buffers(trunk)
    trunk(torch.randn(4, 3, 32, 32) * 3 + 1)
    after = _buffers(trunk)
    assert not torch.equal(
        before["body.stem.bn1.running_mean"], after["body.stem.bn1.running_mean"]
    )


def test_frozen_blocks_get_no_grad_and_stay_in_eval_mode():
    torch.manual_seed(0)
    trunk = feature_map_trunk("mobilenet_v2", frozen_blocks=2).train()
    assert trunk.frozen_blocks == 2
    frozen, trainable = trunk.body[:2], trunk.body[2:]
    assert all(not p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in trainable.parameters())
    assert all(not m.training for block in frozen for m in block.modules())
    assert all(m.training for block in trainable for m in block.modules())

    before = _buffers(frozen)
    trunk(torch.randn(2, 3, 32, 32)).sum().backward()
    for name, value in _buffers(frozen).items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    assert all(p.grad is None for p in frozen.parameters())
    assert all(p.grad is not None for p in trainable.parameters())


def test_frozen_blocks_by_name_and_validation():
    trunk = feature_map_trunk("resnet18", frozen_blocks="layer2")
    assert trunk.block_names == ("stem", "layer1", "layer2", "layer3", "layer4")
    assert trunk.frozen_blocks == 3
    assert not any(p.requires_grad for p in trunk.body.layer2.parameters())
    assert all(p.requires_grad for p in trunk.body.layer3.parameters())
    all_frozen = feature_map_trunk("resnet18", frozen_blocks=5)
    assert not any(p.requires_grad for p in all_frozen.parameters())
    for bad in (-1, 6, "layer9", 1.5, True):
        with pytest.raises(ValueError, match="frozen_blocks"):
            feature_map_trunk("resnet18", frozen_blocks=bad)
    with pytest.raises(ValueError, match="name must be one of"):
        feature_map_trunk("vgg16")
    with pytest.raises(ValueError, match="not both"):
        FeatureMapTrunk("resnet18", "IMAGENET1K_V1", model=torchvision.models.resnet18())


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch):
    """A temporary ``$TORCH_HOME``; returns its ``hub/checkpoints`` folder. Downloads fail."""
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    if Path(torch.hub.get_dir()) != tmp_path / "hub":  # someone called torch.hub.set_dir
        monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    assert Path(torch.hub.get_dir()) == tmp_path / "hub"

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return checkpoints


def test_pretrained_mobilenet_v2_loads_offline_through_torchvision(offline_torch_home):
    if not WEIGHTS_FILE.is_file():
        pytest.skip(f"pretrained weights not found at {WEIGHTS_FILE} (see SPEC section 4)")
    shutil.copy(WEIGHTS_FILE, offline_torch_home / WEIGHTS_FILE.name)

    trunk = feature_map_trunk("mobilenet_v2", weights="IMAGENET1K_V1", progress=False)
    assert trunk.weights is torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    state = torch.load(WEIGHTS_FILE, map_location="cpu", weights_only=True)
    torch.testing.assert_close(trunk.body.stage1[0][0].weight, state["features.0.0.weight"])
    # every tensor of torchvision's `features` is in the trunk, under body.<block>.<index>...
    loaded = {"features." + k.split(".", 2)[2]: v for k, v in trunk.state_dict().items()}
    expected = {k: v for k, v in state.items() if k.startswith("features.")}
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
    with torch.no_grad():
        out = trunk.eval()(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1280, 2, 2)


@pytest.mark.parametrize(
    "side, pool_last, expected_side", [(105, True, 6), (64, True, 4), (28, False, 3)]
)
def test_small_convnet_shapes(side, pool_last, expected_side):
    net = SmallConvNet(1, channels=(8, 16, 16, 32), pool_last=pool_last)
    assert net.out_channels == 32
    assert net.stride == (16 if pool_last else 8)
    out = net(torch.randn(2, 1, side, side))
    assert out.shape == (2, 32, expected_side, expected_side)
    out.mean().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("num_pools, expected_side", [(0, 28), (2, 7), (3, 3), (4, 1)])
def test_small_convnet_num_pools(num_pools, expected_side):
    net = SmallConvNet(1, channels=(4, 4, 4, 8), num_pools=num_pools)
    assert net.stride == 2**num_pools and net.num_pools == num_pools
    assert net.pool_last == (num_pools == 4)
    pools = [isinstance(block[-1], torch.nn.MaxPool2d) for block in net.blocks]
    assert pools == [i < num_pools for i in range(4)]
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 8, expected_side, expected_side)


def test_small_convnet_defaults_and_validation():
    net = SmallConvNet()
    assert net.out_channels == 64 and net.stride == 16
    assert SmallConvNet(3, channels=(4, 5)).out_channels == 5
    with pytest.raises(ValueError, match="shape"):
        net(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError):
        SmallConvNet(channels=())
    with pytest.raises(ValueError):
        SmallConvNet(channels=(8, 0))
    with pytest.raises(ValueError, match="odd"):
        SmallConvNet(kernel_size=4)
    with pytest.raises(ValueError, match="not both"):
        SmallConvNet(pool_last=False, num_pools=2)
    with pytest.raises(ValueError, match=r"num_pools must lie in \[0, len\(channels\)\]"):
        SmallConvNet(channels=(4, 4), num_pools=3)
    with pytest.raises(TypeError, match="num_pools must be an int"):
        SmallConvNet(num_pools=2.0)


def test_googlenet_weights_code_path_with_a_stand_in_checkpoint(offline_torch_home):
    # No GoogLeNet weights exist here: a random checkpoint under torchvision's file name
    # exercises the builder's weights branch (aux heads loaded then dropped, transform_input).
    weights = torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1
    torch.manual_seed(0)
    source = torchvision.models.GoogLeNet(aux_logits=True, init_weights=False)
    torch.save(source.state_dict(), offline_torch_home / Path(weights.url).name)

    trunk = feature_map_trunk("googlenet", weights=weights, progress=False)
    assert trunk.weights is weights
    assert trunk.block_names[0] == "stem" and "transform_input" in dict(
        trunk.body.stem.named_children()
    )
    torch.testing.assert_close(trunk.body.stem.conv1.conv.weight, source.conv1.conv.weight)
    assert not any("aux" in name for name, _ in trunk.named_parameters())
    assert not any("transform_input" in key for key in trunk.state_dict())
    source.eval().aux_logits = False
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        pooled = torch.nn.functional.adaptive_avg_pool2d(trunk.eval()(x), 1).flatten(1)
        source.transform_input = True
        torch.testing.assert_close(source.fc(pooled), source(x), rtol=1e-4, atol=1e-5)
