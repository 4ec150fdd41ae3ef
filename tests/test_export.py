"""Trunk + embedder exported for inference: torch.export, TorchScript (trace) and ONNX.

Every export is compared with the eager module run in float64, at batch sizes 1
and 3 with one exported graph (dynamic batch). An export of the float64 module
(torch.export, TorchScript) must agree with it to a float64 rounding bound, on
any machine; a float32 export (all three; onnxruntime has no float64
convolution) to the float32 bound (``_tolerance``). The embedders' NaN/inf input
check reads tensor values; it is skipped while a graph is captured, and the
eager module still raises ``ValueError``.
"""

import copy
import warnings

import pytest
import torch
from crt_heads import live_fusion

from pml_crt.export import export_onnx, export_program, trace_torchscript
from pml_crt.models import CRT, GlobalPoolEmbedder, MultiHeadCRT, NetVLAD
from pml_crt.trunks import SmallConvNet, feature_map_trunk

BATCH_SIZES = (1, 3)


def _small_model(**multi_head_kwargs):
    torch.manual_seed(0)
    trunk = SmallConvNet(1, pool_last=False)
    embedder = live_fusion(MultiHeadCRT(64, heads=[(8, 32), (4, 16)], **multi_head_kwargs))
    return torch.nn.Sequential(trunk, embedder).eval(), torch.randn(3, 1, 28, 28)


def _mobilenet_model():
    torch.manual_seed(0)
    trunk = feature_map_trunk("mobilenet_v2", weights=None)
    embedder = CRT(trunk.out_channels, embedding_size=32, num_prototypes=8, projection_dim=64)
    live_fusion(embedder)  # the GeM branch and the coded residuals both reach the output
    # 64 x 64 images give a 2 x 2 map of 1280 channels.
    return torch.nn.Sequential(trunk, embedder).eval(), torch.randn(3, 3, 64, 64)


MODELS = {"smallconvnet-multihead": _small_model, "mobilenet_v2-crt": _mobilenet_model}


@pytest.fixture(scope="module", params=list(MODELS))
def model_and_images(request):
    return MODELS[request.param]()


def _tolerance(model, images, dtype):
    """How far an export's output row may be from the exact one, relative to the row's norm.

    A dot product of length n computed in ``dtype`` is off by at most n u of the
    sum of |terms|, u = eps / 2 (Higham, "Accuracy and Stability of Numerical
    Algorithms", 3.1), and the layers' errors add: the length is the sum of every
    weight's fan-in (a convolution's in_channels/groups x kernel area, a linear
    layer's inputs, a prototype's length), plus the embedder's sums over the N
    positions and its norms over the d features. The embedder's softmax (cos / T
    in CRT, 2 alpha x.c in NetVLAD) multiplies the error before it by up to 1 / T
    (2 alpha). We take eps, not u, per term: the normalisations and the last
    layer's cancellation make the error relative to the row's norm larger than
    relative to the sum of |terms|. A worst case: float32 exports measure ~1e-4
    of it; a float64 export is held to the same length times float64's eps.
    """
    with torch.no_grad():
        features = model[0](images[:1]) if isinstance(model, torch.nn.Sequential) else images[:1]
    positions = features[0, 0].numel() if features.dim() == 4 else features.shape[1]
    length = sum(p[0].numel() for p in model.parameters() if p.dim() >= 2)
    sharpness = 1.0
    for module in model.modules():
        if isinstance(module, (CRT, NetVLAD)):
            length += positions + 3 * module.projection_dim
        if isinstance(module, GlobalPoolEmbedder):
            length += positions
        if isinstance(module, CRT):
            sharpness = max(sharpness, 1 / module.temperature_value)
        if isinstance(module, NetVLAD) and module.alpha is not None:
            sharpness = max(sharpness, 2 * module.alpha)
    return length * sharpness * torch.finfo(dtype).eps


def _assert_parity(run, model, images, dtype=torch.float32):
    """``run``, an export of ``model`` in ``dtype``, against ``model`` in float64."""
    exact = copy.deepcopy(model).double()
    tolerance = _tolerance(model, images, dtype)
    for batch in BATCH_SIZES:
        x = images[:batch]
        with torch.no_grad():
            expected = exact(x.double())
            actual = torch.as_tensor(run(x.to(dtype)))
        assert actual.dtype == dtype
        assert actual.shape == expected.shape == (batch, expected.shape[1])
        errors = (actual.double() - expected).norm(dim=1) / expected.norm(dim=1)
        assert float(errors.max()) <= tolerance, f"batch {batch}: {errors.tolist()} > {tolerance}"


def _double(model, images):
    return copy.deepcopy(model).double(), images.double()


# --- torch.export ---


def test_torch_export_dynamic_batch(model_and_images):
    model, images = model_and_images
    program = export_program(model, images)
    _assert_parity(program.module(), model, images)
    model64, images64 = _double(model, images)
    _assert_parity(export_program(model64, images64).module(), model, images, torch.float64)


def test_torch_export_plain_call_with_batch_dim():
    """The recipe without the helper: ``torch.export.export`` with a ``Dim`` on the batch."""
    model, images = _small_model()
    model64, images64 = _double(model, images)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model64, (images64,), dynamic_shapes=({0: batch},))
    _assert_parity(program.module(), model, images, torch.float64)


def test_torch_export_from_batch_one_example_stays_dynamic():
    # A batch-1 example would make torch.export specialise the batch to 1.
    model, images = _small_model()
    model64, images64 = _double(model, images)
    program = export_program(model64, images64[:1])
    _assert_parity(program.module(), model, images, torch.float64)


def test_torch_export_save_load_round_trip(tmp_path):
    model, images = _small_model()
    model64, images64 = _double(model, images)
    path = tmp_path / "model.pt2"
    torch.export.save(export_program(model64, images64), path)
    _assert_parity(torch.export.load(path).module(), model, images, torch.float64)


def test_torch_export_concat_eval_output():
    model, images = _small_model(eval_output="concat")
    model64, images64 = _double(model, images)
    program = export_program(model64, images64)
    _assert_parity(program.module(), model, images, torch.float64)
    assert program.module()(images64).shape == (3, 48)


@pytest.mark.parametrize("assignment", ["prototypes", "positions"])
@pytest.mark.parametrize("residual", ["orthogonal", "prototype"])
@pytest.mark.parametrize("fusion", ["flatten", "sum"])
def test_torch_export_every_crt_option(assignment, residual, fusion):
    torch.manual_seed(0)
    crt = CRT(
        16, 8, 4, assignment=assignment, residual=residual, fusion=fusion, global_pooling=None
    ).eval()
    tokens = torch.randn(3, 5, 16)  # (B, N, C) layout
    crt64, tokens64 = _double(crt, tokens)
    _assert_parity(export_program(crt64, tokens64).module(), crt, tokens, torch.float64)


@pytest.mark.parametrize(
    "embedder",
    [lambda: NetVLAD(16, 8, 4), lambda: GlobalPoolEmbedder(16, 8, pooling="gem")],
    ids=["NetVLAD", "GeM"],
)
def test_torch_export_other_embedders(embedder):
    torch.manual_seed(0)
    module = embedder().eval()
    maps = torch.randn(3, 16, 3, 3)
    module64, maps64 = _double(module, maps)
    _assert_parity(export_program(module64, maps64).module(), module, maps, torch.float64)


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
    _assert_parity(trace_torchscript(model, images), model, images)
    traced = trace_torchscript(*_double(model, images))
    _assert_parity(traced, model, images, torch.float64)
    path = tmp_path / "model.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
        torch.jit.save(traced, path)
        loaded = torch.jit.load(path)
    _assert_parity(loaded, model, images, torch.float64)


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
