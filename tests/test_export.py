"""Trunk + embedder exported for inference: torch.export, TorchScript (trace) and ONNX.

Every export is compared with the eager module in float32 (``atol=1e-5``) at
batch sizes 1 and 3 with one exported graph (dynamic batch). The embedders'
NaN/inf input check reads tensor values; it is skipped while a graph is
captured, and the eager module still raises ``ValueError``.
"""

import warnings

import pytest
import torch

from pml_crt.export import export_onnx, export_program, trace_torchscript
from pml_crt.models import CRT, GlobalPoolEmbedder, MultiHeadCRT, NetVLAD
from pml_crt.trunks import SmallConvNet, feature_map_trunk

ATOL = 1e-5
RTOL = 1e-5
BATCH_SIZES = (1, 3)


def _small_model(**multi_head_kwargs):
    torch.manual_seed(0)
    trunk = SmallConvNet(1, pool_last=False)
    embedder = MultiHeadCRT(64, heads=[(8, 32), (4, 16)], **multi_head_kwargs)
    return torch.nn.Sequential(trunk, embedder).eval(), torch.randn(3, 1, 28, 28)


def _mobilenet_model():
    torch.manual_seed(0)
    trunk = feature_map_trunk("mobilenet_v2", weights=None)
    embedder = CRT(trunk.out_channels, embedding_size=32, num_prototypes=8, projection_dim=64)
    # 64 x 64 images give a 2 x 2 map of 1280 channels.
    return torch.nn.Sequential(trunk, embedder).eval(), torch.randn(3, 3, 64, 64)


MODELS = {"smallconvnet-multihead": _small_model, "mobilenet_v2-crt": _mobilenet_model}


@pytest.fixture(scope="module", params=list(MODELS))
def model_and_images(request):
    return MODELS[request.param]()


def _assert_parity(run, model, images):
    for batch in BATCH_SIZES:
        x = images[:batch]
        with torch.no_grad():
            expected = model(x)
            actual = run(x)
        actual = torch.as_tensor(actual)
        assert actual.shape == expected.shape == (batch, expected.shape[1])
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


# --- torch.export ---


def test_torch_export_dynamic_batch(model_and_images):
    model, images = model_and_images
    program = export_program(model, images)
    _assert_parity(program.module(), model, images)


def test_torch_export_plain_call_with_batch_dim():
    """The recipe without the helper: ``torch.export.export`` with a ``Dim`` on the batch."""
    model, images = _small_model()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (images,), dynamic_shapes=({0: batch},))
    _assert_parity(program.module(), model, images)


def test_torch_export_from_batch_one_example_stays_dynamic():
    # A batch-1 example would make torch.export specialise the batch to 1.
    model, images = _small_model()
    program = export_program(model, images[:1])
    _assert_parity(program.module(), model, images)


def test_torch_export_save_load_round_trip(tmp_path):
    model, images = _small_model()
    path = tmp_path / "model.pt2"
    torch.export.save(export_program(model, images), path)
    _assert_parity(torch.export.load(path).module(), model, images)


def test_torch_export_concat_eval_output():
    model, images = _small_model(eval_output="concat")
    program = export_program(model, images)
    _assert_parity(program.module(), model, images)
    assert program.module()(images).shape == (3, 48)


@pytest.mark.parametrize("assignment", ["prototypes", "positions"])
@pytest.mark.parametrize("residual", ["orthogonal", "prototype"])
@pytest.mark.parametrize("fusion", ["flatten", "sum"])
def test_torch_export_every_crt_option(assignment, residual, fusion):
    torch.manual_seed(0)
    crt = CRT(16, 8, 4, assignment=assignment, residual=residual, fusion=fusion).eval()
    tokens = torch.randn(3, 5, 16)  # (B, N, C) layout
    _assert_parity(export_program(crt, tokens).module(), crt, tokens)


@pytest.mark.parametrize(
    "embedder",
    [lambda: NetVLAD(16, 8, 4), lambda: GlobalPoolEmbedder(16, 8, pooling="gem")],
    ids=["NetVLAD", "GeM"],
)
def test_torch_export_other_embedders(embedder):
    torch.manual_seed(0)
    module = embedder().eval()
    maps = torch.randn(3, 16, 3, 3)
    _assert_parity(export_program(module, maps).module(), module, maps)


def test_value_check_skipped_in_export_but_kept_in_eager():
    model, images = _small_model()
    program = export_program(model, images)
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"\bx\b.*NaN or infinite"):
        model(bad)
    with pytest.raises(ValueError, match=r"\bx\b.*NaN or infinite"):
        model[1](torch.full((2, 64, 3, 3), float("inf")))
    # The exported graph has no value check: NaN propagates instead of raising.
    with torch.no_grad():
        assert torch.isnan(program.module()(bad)[0]).all()
    # The check is only skipped during capture: eager still raises after an export.
    with pytest.raises(ValueError, match="NaN or infinite"):
        model(bad)


def test_export_refuses_training_mode():
    model, images = _small_model()
    with pytest.raises(ValueError, match="eval"):
        export_program(model.train(), images)


# --- TorchScript ---


def test_torchscript_trace_dynamic_batch(model_and_images, tmp_path):
    model, images = model_and_images
    traced = trace_torchscript(model, images)
    _assert_parity(traced, model, images)
    path = tmp_path / "model.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
        torch.jit.save(traced, path)
        loaded = torch.jit.load(path)
    _assert_parity(loaded, model, images)


# --- ONNX ---


def _onnx_parity(model, images, path, dynamo):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    export_onnx(model, images, path, opset_version=18, dynamo=dynamo)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (input_meta,) = session.get_inputs()
    assert input_meta.name == "images" and not isinstance(input_meta.shape[0], int)
    _assert_parity(lambda x: session.run(["embeddings"], {"images": x.numpy()})[0], model, images)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript-exporter"])
def test_onnx_small_convnet_multihead(dynamo, tmp_path):
    model, images = _small_model()
    _onnx_parity(model, images, tmp_path / "model.onnx", dynamo)


def test_onnx_mobilenet_torchscript_exporter(tmp_path):
    model, images = _mobilenet_model()
    _onnx_parity(model, images, tmp_path / "model.onnx", dynamo=False)


@pytest.mark.slow
def test_onnx_mobilenet_dynamo(tmp_path):
    model, images = _mobilenet_model()
    _onnx_parity(model, images, tmp_path / "model.onnx", dynamo=True)


def test_onnx_refuses_old_opset(tmp_path):
    model, images = _small_model()
    with pytest.raises(ValueError, match="opset_version"):
        export_onnx(model, images, tmp_path / "model.onnx", opset_version=16)
