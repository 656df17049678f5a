"""Model registry: every model builds and predicts; layers, weights and torchvision parity.

Cost on 2 CPU cores: every registry model is built and run in eval mode on a 64 px image;
a training step (losses + backward) runs for every model except the ResNet-101 ones, whose
code paths are those of ResNet-50 with a deeper torchvision ResNet. Single-threaded torch
(see ``_one_thread``) keeps the file at ~40 s.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import detection as tvdet
from torchvision.models import segmentation as tvseg
from torchvision.ops.misc import FrozenBatchNorm2d

import maskd.models as M
from maskd.models.resnet_dilated import resnet18_dilated


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small convolutions run ~3x faster single-threaded on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


DETECTION = M.available("detection")
SEGMENTATION = M.available("segmentation")
# Training steps for every model but the ResNet-101 ones (~8 s together; their code paths are
# the ResNet-50 ones with a deeper torchvision ResNet, and their eval forward still runs).
TRAIN_SUBSET = [n for n in M.available() if "resnet101" not in n]
SMALL = {"min_size": 64, "max_size": 64}
FEW_PROPOSALS = {"rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 50}
K = 3


def _build(name: str, **kwargs):
    torch.manual_seed(0)
    extra = {}
    if M.task_of(name) == "detection":
        extra = {**SMALL, **(FEW_PROPOSALS if name.startswith("fasterrcnn") else {})}
    return M.build(name, K, **{**extra, **kwargs})


def _capture(model: nn.Module, path: str):
    """Register a hook storing the output of module ``path``; returns (store, handle)."""
    store: dict[str, object] = {}
    module = dict(model.named_modules())[path]
    handle = module.register_forward_hook(lambda m, i, o: store.__setitem__("out", o))
    return store, handle


def _det_batch():
    images = [torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[8.0, 10.0, 40.0, 50.0]]), "labels": torch.tensor([2])}]
    return images, targets


# --- registry ---------------------------------------------------------------------------------


def test_available_lists_every_family():
    names = M.available()
    for arch in ("fasterrcnn", "retinanet", "fcos"):
        for bb in ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large"):
            assert f"{arch}_{bb}_fpn" in names
            assert M.task_of(f"{arch}_{bb}_fpn") == "detection"
    for name in (
        *(f"deeplabv3_resnet{d}" for d in (18, 50, 101)),
        *(f"fcn_resnet{d}" for d in (18, 50, 101)),
        "deeplabv3_mobilenet_v3_large",
        "lraspp_mobilenet_v3_large",
    ):
        assert name in names
        assert M.task_of(name) == "segmentation"
    assert sorted(DETECTION + SEGMENTATION) == names == sorted(set(names))


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="retinanet_resnet50_fpn"):
        M.build("retinanet_resnet50", K)
    with pytest.raises(ValueError, match="unknown model"):
        M.task_of("yolo")
    with pytest.raises(TypeError, match="model name"):
        M.task_of(3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_classes": 0}, ValueError, "num_classes"),
        ({"num_classes": 2.0}, TypeError, "num_classes"),
        ({"num_classes": K, "min_size": 128, "max_size": 64}, ValueError, "min_size"),
        ({"num_classes": K, "bogus": 1}, TypeError, "bogus"),
        ({"num_classes": K, "trainable_backbone_layers": 7}, ValueError, "trainable"),
        ({"num_classes": K, "weights": "/nonexistent/w.pt"}, FileNotFoundError, "w.pt"),
        ({"num_classes": K, "backbone_weights": 5}, TypeError, "backbone_weights"),
        ({"num_classes": K, "min_size": (64, 0)}, ValueError, "min_size"),
        ({"num_classes": K, "weights_prefix": "model."}, ValueError, "weights_prefix"),
    ],
)
def test_bad_detection_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        M.build("fcos_resnet18_fpn", **kwargs)


def test_detection_size_options_reach_torchvision():
    model, _ = M.build("fcos_resnet18_fpn", K, min_size=(64, 96), max_size=160, score_thresh=0.3)
    assert model.transform.min_size == (64, 96)
    assert model.transform.max_size == 160
    assert model.score_thresh == 0.3
    assert model.head.classification_head.num_classes == K + 1
    model.eval()
    batch = torch.rand(2, 3, 48, 80)  # a batched tensor is accepted as well as a list
    with torch.no_grad():
        assert model.transform(batch)[0].tensors.shape[-2:] == (96, 160)
        assert len(model(batch)) == 2


def test_bad_segmentation_arguments():
    with pytest.raises(ValueError, match="auxiliary"):
        M.build("lraspp_mobilenet_v3_large", K, aux_loss=True)
    with pytest.raises(ValueError, match="layers"):
        M.build("deeplabv3_resnet18", K, layers="neck")
    with pytest.raises(TypeError, match="unexpected keyword"):
        M.build("deeplabv3_resnet18", K, min_size=64)


def test_layers_choice():
    model, layers = M.build("fcn_resnet18", K, layers="backbone", aux_loss=False)
    assert layers == ["model.backbone.layer4"]
    assert model.model.aux_classifier is None
    store, handle = _capture(model, layers[0])
    with torch.no_grad():
        model.eval()(torch.rand(1, 3, 64, 64))
    handle.remove()
    assert store["out"].shape == (1, 512, 8, 8)


def test_describe_rows_match_real_models():
    rows = {r.name: r for r in M.describe()}
    assert sorted(rows) == M.available()
    for name in ("lraspp_mobilenet_v3_large", "fcos_mobilenet_v3_large_fpn"):
        classes = M.registry.DEFAULT_CLASSES[M.task_of(name)]
        model, layers = M.build(name, classes)
        assert rows[name].num_params == sum(p.numel() for p in model.parameters())
        assert rows[name].default_layers == layers
        assert rows[name].task == M.task_of(name)
    assert rows["deeplabv3_resnet50"].alternative_layers == {"backbone": ["model.backbone.layer4"]}
    # torchvision documents 42,004,074 parameters for deeplabv3_resnet50 with 21 classes
    seg21 = {r.name: r.num_params for r in M.describe(num_classes=21, task="segmentation")}
    assert seg21["deeplabv3_resnet50"] == 42_004_074


# --- every model: build + eval forward -----------------------------------------------------


@pytest.mark.parametrize("name", DETECTION)
def test_detector_eval_and_fpn_levels(name):
    model, layers = _build(name)
    assert layers == ["backbone.fpn"]
    model.eval()
    images, _ = _det_batch()
    store, handle = _capture(model, layers[0])
    with torch.no_grad():
        preds = model(images)
    handle.remove()
    assert len(preds) == 1 and set(preds[0]) == {"boxes", "scores", "labels"}
    assert preds[0]["boxes"].shape[-1] == 4
    if len(preds[0]["labels"]):
        assert int(preds[0]["labels"].max()) <= K  # K foreground + background
    if "resnet" in name:
        depth = int(name.split("resnet")[1].split("_")[0])
        blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}
        body = model.backbone.body
        assert [len(getattr(body, f"layer{i}")) for i in range(1, 5)] == blocks[depth]
    levels = store["out"]
    assert all(v.shape[1] == 256 for v in levels.values())
    side = model.transform(images)[0].tensors.shape[-1]
    sizes = [v.shape[-1] for v in levels.values()]
    if name.startswith("fasterrcnn_mobilenet"):  # torchvision's: two stride-32 maps + pool
        strides = [32, 32, 64]
    elif name.startswith("fasterrcnn"):  # P2–P6
        strides = [4, 8, 16, 32, 64]
    else:  # P3–P7
        strides = [8, 16, 32, 64, 128]
    assert sizes == [math.ceil(side / s) for s in strides]


@pytest.mark.parametrize("name", SEGMENTATION)
def test_segmenter_eval_and_logits_layer(name):
    model, layers = _build(name)
    model.eval()
    x = torch.rand(2, 3, 64, 64)
    store, handle = _capture(model, layers[0])
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    assert logits.shape == (2, K, 64, 64)
    # ResNets are dilated to output stride 8; DeepLabV3-MobileNetV3 has stride 16, LRASPP's
    # head returns its logits at the stride-8 branch
    stride = 16 if name == "deeplabv3_mobilenet_v3_large" else 8
    assert store["out"].shape == (2, K, 64 // stride, 64 // stride)
    for path in M.get_spec(name).alternative_layers["backbone"]:
        assert path in dict(model.named_modules())


# --- training steps ------------------------------------------------------------------------


@pytest.mark.parametrize("name", TRAIN_SUBSET)
def test_train_step(name):
    model, layers = _build(name)
    model.train()
    if M.task_of(name) == "detection":
        images, targets = _det_batch()
        losses = model(images, targets)
    else:
        losses = model(torch.rand(2, 3, 64, 64), torch.randint(0, K, (2, 64, 64)))
        expected = {"loss_seg"} if name.startswith("lraspp") else {"loss_seg", "loss_aux"}
        assert set(losses) == expected
    assert losses and all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    tapped = dict(model.named_modules())[layers[0]]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tapped.parameters())
    for p in model.parameters():
        if not p.requires_grad:
            assert p.grad is None


# --- torchvision parity ----------------------------------------------------------------------


def _tv_segmenter(name: str):
    def build(k: int) -> nn.Module:
        fn = getattr(tvseg, name)
        return fn(weights=None, weights_backbone=None, num_classes=k, aux_loss=True)

    return build


TORCHVISION_TWINS = {
    "fasterrcnn_resnet50_fpn": lambda k: tvdet.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=k + 1
    ),
    "fasterrcnn_mobilenet_v3_large_fpn": lambda k: tvdet.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=k + 1
    ),
    "retinanet_resnet50_fpn": lambda k: tvdet.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=k + 1
    ),
    "fcos_resnet50_fpn": lambda k: tvdet.fcos_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=k + 1
    ),
    **{
        f"{arch}_{bb}": _tv_segmenter(f"{arch}_{bb}")
        for arch, bb in [
            ("deeplabv3", "resnet50"),
            ("deeplabv3", "resnet101"),
            ("fcn", "resnet50"),
            ("fcn", "resnet101"),
            ("deeplabv3", "mobilenet_v3_large"),
        ]
    },
    "lraspp_mobilenet_v3_large": lambda k: tvseg.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=k
    ),
}


def _exported(name: str, model: nn.Module) -> nn.Module:
    return model.model if M.task_of(name) == "segmentation" else model


@pytest.mark.parametrize("name", sorted(TORCHVISION_TWINS))
def test_state_dict_keys_match_torchvision(name):
    with torch.device("meta"):
        ours = _exported(name, M.build(name, 5)[0]).state_dict()
        theirs = TORCHVISION_TWINS[name](5).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_fpn", "lraspp_mobilenet_v3_large"])
def test_exported_weights_load_into_torchvision_builder(name):
    model, _ = _build(name)
    twin = TORCHVISION_TWINS[name](K)
    twin.load_state_dict(_exported(name, model).state_dict(), strict=True)
    model.eval()
    twin.eval()
    with torch.no_grad():
        if M.task_of(name) == "detection":
            images = [torch.rand(3, 64, 64)]
            body = model.backbone(model.transform(images)[0].tensors)
            twin_body = twin.backbone(model.transform(images)[0].tensors)
            for key in body:
                torch.testing.assert_close(body[key], twin_body[key])
        else:
            x = torch.rand(1, 3, 64, 64)
            torch.testing.assert_close(model(x), twin(x)["out"])


# --- dilated ResNet-18 -------------------------------------------------------------------------


def test_dilated_resnet18_matches_torchvision_resnet18():
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None).eval()
    plain = resnet18_dilated((False, False, False)).eval()
    dilated = resnet18_dilated().eval()
    assert {k: v.shape for k, v in dilated.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    plain.load_state_dict(reference.state_dict(), strict=True)
    dilated.load_state_dict(reference.state_dict(), strict=True)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), reference(x))
        feats = nn.Sequential(*list(dilated.children())[:-2])(x)
        c3 = nn.Sequential(*list(dilated.children())[:-3])(x)
    assert feats.shape == (1, 512, 8, 8)  # output stride 8
    assert c3.shape == (1, 256, 8, 8)
    conv = dilated.layer4[1].conv1
    assert conv.dilation == (4, 4) and conv.padding == (4, 4)
    assert dilated.layer3[0].conv1.stride == (1, 1)


# --- backbone weights from disk ------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    torch.manual_seed(2)
    net = torchvision.models.resnet18(weights=None)
    for m in net.modules():  # non-default statistics, so copying them is observable
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    path = tmp_path_factory.mktemp("w") / "resnet18.pth"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


def test_backbone_weights_are_copied_detection(resnet18_file):
    path, reference = resnet18_file
    model, _ = M.build("retinanet_resnet18_fpn", K, backbone_weights=path, **SMALL)
    body = model.backbone.body
    for key in ("conv1.weight", "layer1.0.conv1.weight", "layer4.1.bn2.running_mean"):
        torch.testing.assert_close(body.state_dict()[key], reference[key], rtol=0, atol=0)
    # torchvision's pretrained-backbone defaults: frozen BN, conv1 + layer1 frozen
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad
    model, _ = M.build(
        "retinanet_resnet18_fpn",
        K,
        backbone_weights=path,
        frozen_bn=False,
        trainable_backbone_layers=5,
        **SMALL,
    )
    assert isinstance(model.backbone.body.bn1, nn.BatchNorm2d)
    assert all(p.requires_grad for p in model.parameters())


def test_backbone_weights_are_copied_segmentation(resnet18_file):
    path, reference = resnet18_file
    model, _ = M.build("deeplabv3_resnet18", K, backbone_weights=path)
    body = model.model.backbone
    for key in ("conv1.weight", "layer3.0.downsample.0.weight", "layer4.0.bn1.running_var"):
        torch.testing.assert_close(body.state_dict()[key], reference[key], rtol=0, atol=0)


def test_backbone_weights_mobilenet(tmp_path):
    torch.manual_seed(3)
    net = torchvision.models.mobilenet_v3_large(weights=None)
    torch.save(net.state_dict(), tmp_path / "mnv3.pth")
    model, _ = M.build("lraspp_mobilenet_v3_large", K, backbone_weights=tmp_path / "mnv3.pth")
    ours = model.model.backbone.state_dict()
    for key in ("0.0.weight", "16.0.weight", "13.block.0.0.weight"):
        torch.testing.assert_close(ours[key], net.state_dict()[f"features.{key}"], rtol=0, atol=0)


def test_backbone_weights_mismatch_errors(tmp_path, resnet18_file):
    path, reference = resnet18_file
    with pytest.raises(ValueError, match=r"shape mismatches|missing keys"):
        M.build("fcos_resnet50_fpn", K, backbone_weights=path, **SMALL)
    broken = dict(reference)
    del broken["layer2.0.conv1.weight"]
    broken["extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"layer2\.0\.conv1\.weight") as info:
        M.build("fcos_resnet18_fpn", K, backbone_weights=tmp_path / "broken.pth", **SMALL)
    assert "extra.weight" in str(info.value) and "broken.pth" in str(info.value)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(TypeError, match="list"):
        M.build("fcos_resnet18_fpn", K, backbone_weights=tmp_path / "list.pth", **SMALL)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        M.build("fcos_resnet18_fpn", K, backbone_weights=tmp_path / "junk.pth", **SMALL)


# --- whole-model checkpoints ---------------------------------------------------------------


@pytest.fixture(scope="module")
def lraspp_source():
    torch.manual_seed(4)
    model, _ = M.build("lraspp_mobilenet_v3_large", K)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # differ from a fresh seed-4 build as well
    return model.state_dict()


def _same(model: nn.Module, reference: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["plain", "state_dict", "lightning", "inner_torchvision"])
def test_checkpoint_layouts(tmp_path, lraspp_source, layout):
    if layout == "plain":
        obj = lraspp_source
    elif layout == "state_dict":
        obj = {"state_dict": lraspp_source, "epoch": 3}
    elif layout == "lightning":  # what a LightningModule keeping the task at self.model saves
        obj = {
            "epoch": 1,
            "global_step": 10,
            "pytorch-lightning_version": "2.6.6",
            "state_dict": {f"model.{k}": v for k, v in lraspp_source.items()},
            "optimizer_states": [],
            "lr_schedulers": [],
            "hyper_parameters": {"lr": 0.1, "name": "lraspp_mobilenet_v3_large"},
        }
    else:  # a bare torchvision LRASPP state dict, without the task wrapper's "model." prefix
        obj = {k.removeprefix("model."): v for k, v in lraspp_source.items()}
    torch.save(obj, tmp_path / "ckpt.pt")
    model, _ = M.build("lraspp_mobilenet_v3_large", K, weights=tmp_path / "ckpt.pt")
    _same(model, lraspp_source)


def test_checkpoint_prefix_ambiguity_and_choice(tmp_path, lraspp_source):
    torch.manual_seed(5)
    other = M.build("lraspp_mobilenet_v3_large", K)[0].state_dict()
    state = {f"student.{k}": v for k, v in lraspp_source.items()}
    state.update({f"teacher.{k}": v for k, v in other.items()})
    torch.save({"state_dict": state}, tmp_path / "kd.ckpt")
    with pytest.raises(ValueError, match="weights_prefix"):
        M.build("lraspp_mobilenet_v3_large", K, weights=tmp_path / "kd.ckpt")
    model, _ = M.build(
        "lraspp_mobilenet_v3_large", K, weights=tmp_path / "kd.ckpt", weights_prefix="teacher."
    )
    _same(model, other)
    with pytest.raises(ValueError, match="no key starts with"):
        M.build("lraspp_mobilenet_v3_large", K, weights=tmp_path / "kd.ckpt", weights_prefix="x.")


def test_checkpoint_with_other_modules_extra_state(tmp_path, lraspp_source):
    """A distillation checkpoint also holds non-tensor extra state (the loss's step counter)
    outside the student's prefix: loading the student ignores it; inside the prefix it is
    still refused."""
    state = {f"net.student.{k}": v for k, v in lraspp_source.items()}
    state["net.loss._extra_state"] = {"steps": 3}
    torch.save({"state_dict": state}, tmp_path / "kd.ckpt")
    model, _ = M.build(
        "lraspp_mobilenet_v3_large", K, weights=tmp_path / "kd.ckpt", weights_prefix="net.student."
    )
    _same(model, lraspp_source)
    with pytest.raises(TypeError, match=r"entries that are not tensors: net\.loss\._extra_state"):
        M.build("lraspp_mobilenet_v3_large", K, weights=tmp_path / "kd.ckpt", weights_prefix="net.")


def test_checkpoint_wrong_num_classes(tmp_path, lraspp_source):
    torch.save(lraspp_source, tmp_path / "k3.pt")
    with pytest.raises(ValueError, match=r"shape mismatches.*classifier"):
        M.build("lraspp_mobilenet_v3_large", K + 2, weights=tmp_path / "k3.pt")


def test_detector_checkpoint_into_frozen_bn_model(tmp_path):
    """A BatchNorm-trained detector reloads (pretrained → FrozenBN) with identical outputs."""
    torch.manual_seed(6)
    source, _ = M.build("fcos_mobilenet_v3_large_fpn", K, **SMALL)
    source.eval()
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}},
               tmp_path / "det.ckpt")  # fmt: skip
    model, _ = M.build("fcos_mobilenet_v3_large_fpn", K, weights=tmp_path / "det.ckpt", **SMALL)
    assert isinstance(model.backbone.body["0"][1], FrozenBatchNorm2d)
    model.eval()
    x = model.transform([torch.rand(3, 64, 64)])[0].tensors
    with torch.no_grad():
        ours, theirs = model.backbone(x), source.backbone(x)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key])


def test_real_lightning_checkpoint(tmp_path):
    """A checkpoint written by Lightning's Trainer for a module keeping the task at self.model."""
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):
        def __init__(self, lr: float = 0.1) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = M.build("lraspp_mobilenet_v3_large", K)[0]

        def training_step(self, batch, batch_idx):
            images, masks = batch
            return sum(self.model(images, masks).values())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    data = torch.utils.data.TensorDataset(
        torch.rand(2, 3, 32, 32), torch.randint(0, K, (2, 32, 32))
    )
    module = Module()
    trainer = lightning.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    model, _ = M.build("lraspp_mobilenet_v3_large", K, weights=tmp_path / "last.ckpt")
    _same(model, module.model.state_dict())


def test_fcos_box_regression_bias_option():
    from maskd.models import build

    torch.manual_seed(0)
    model, _ = build("fcos_resnet18_fpn", num_classes=2, min_size=64, max_size=64,
                     box_regression_bias=0.5)  # fmt: skip
    bias = model.head.regression_head.bbox_reg.bias
    assert torch.equal(bias, torch.full_like(bias, 0.5))
    torch.manual_seed(0)
    default, _ = build("fcos_resnet18_fpn", num_classes=2, min_size=64, max_size=64)
    assert torch.equal(default.head.regression_head.bbox_reg.bias, torch.zeros(4))

    # (nearly) every distance starts positive, so the ReLU passes a gradient for every side;
    # with torchvision's zero bias many start clipped
    def active(net):
        outputs = []
        net.head.regression_head.bbox_reg.register_forward_hook(lambda m, i, o: outputs.append(o))
        torch.manual_seed(0)
        with torch.no_grad():
            net.eval()([torch.rand(3, 64, 64)])
        return float(torch.cat([o.flatten() for o in outputs]).gt(0).float().mean())

    assert active(model) > 0.99 and active(default) < 0.9
    with pytest.raises(ValueError, match="FCOS only"):
        build("retinanet_resnet18_fpn", num_classes=2, box_regression_bias=0.5)


def test_anchor_sizes_option():
    """Base anchor sizes per level: torchvision's own give its anchors exactly; a quarter
    of them (a 64 px image) gives anchors a quarter the size, and a box of 10 px then has
    positive anchors on P3 that torchvision's sizes never give it."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.retinanet import _default_anchorgen

    ours, _ = M.build("retinanet_resnet18_fpn", K, anchor_sizes=[32, 64, 128, 256, 512])
    default = _default_anchorgen()
    for a, b in zip(ours.anchor_generator.cell_anchors, default.cell_anchors, strict=True):
        assert torch.equal(a, b)
    small, _ = M.build("retinanet_resnet18_fpn", K, min_size=64, max_size=64,
                       anchor_sizes=[8, 16, 32, 64, 128])  # fmt: skip
    p3 = small.anchor_generator.cell_anchors[0]  # [9, 4]: 3 ratios x 3 scales, centred at 0
    assert torch.equal(p3, AnchorGenerator.generate_anchors(
        AnchorGenerator(), [8, 10, 12], [0.5, 1.0, 2.0]).round())  # fmt: skip

    def positives(net):
        net.train()
        image = torch.rand(3, 64, 64)
        target = {"boxes": torch.tensor([[20.0, 20.0, 30.0, 30.0]]), "labels": torch.tensor([1])}
        images, targets = net.transform([image], [target])
        features = list(net.backbone(images.tensors).values())
        anchors = net.anchor_generator(images, features)[0]
        iou = torchvision.ops.box_iou(targets[0]["boxes"], anchors)
        return int((iou >= net.proposal_matcher.high_threshold).sum())

    torchvision_sizes, _ = M.build("retinanet_resnet18_fpn", K, min_size=64, max_size=64)
    assert positives(small) > 0 and positives(torchvision_sizes) == 0
    rcnn, _ = M.build("fasterrcnn_resnet18_fpn", K, anchor_sizes=[4, 8, 16, 32, 64])
    assert [tuple(s) for s in rcnn.rpn.anchor_generator.sizes] == [(4,), (8,), (16,), (32,), (64,)]


@pytest.mark.parametrize(
    ("name", "sizes", "match"),
    [
        ("fcos_resnet18_fpn", [8, 16, 32, 64, 128], "FCOS is anchor-free"),
        ("retinanet_resnet18_fpn", [8, 16, 32], "5 positive numbers"),
        ("retinanet_resnet18_fpn", [8, 16, 0, 64, 128], "5 positive numbers"),
        ("retinanet_resnet18_fpn", "8", "5 positive numbers"),
        ("retinanet_resnet18_fpn", [8, 16, 32, 64, float("inf")], "5 positive numbers"),
        ("retinanet_resnet18_fpn", [8, 16, 32, 64, float("nan")], "5 positive numbers"),
        ("fasterrcnn_mobilenet_v3_large_fpn", [8, 16, 32, 64, 128], "rpn_anchor_generator"),
    ],
)
def test_bad_anchor_sizes_are_named(name, sizes, match):
    with pytest.raises(ValueError, match=match):
        M.build(name, K, anchor_sizes=sizes)
