"""Tests for maskd.taps: levels of named layer outputs (captured, replaced, stopped at), and the
detectors' resized batch."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import Tensor, nn

from maskd.recorder import Record, Recorder
from maskd.taps import (
    RESIZE,
    FeatureTaps,
    eval_mode,
    flatten_output,
    level_key,
    probe_levels,
    rebuild_output,
    resize_records,
    resized_batch,
    resolve_layers,
)
from tiny_models import Tiny


@pytest.fixture
def model() -> Tiny:
    torch.manual_seed(0)
    return Tiny(norm=True)


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_captures_tensor_dict_and_tuple_levels(model: Tiny) -> None:
    x = torch.randn(2, 3, 8, 8)
    taps = FeatureTaps(model, ["merge", "stem", "split"])
    with taps:
        model(x)
    stem = model.stem(x)
    expected = {
        "merge:0": stem * 2,
        "merge:1": stem[:, :, ::2, ::2] + 1,
        "stem": stem,
        "split:low": stem,
        "split:high": stem[:, :, ::2, ::2],
    }
    # Levels follow the order the layers were named in, then output order.
    assert list(taps.features) == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(taps.features[name], value, rtol=0, atol=0)
    assert taps.levels() == {
        "merge": ["merge:0", "merge:1"],
        "stem": ["stem"],
        "split": ["split:low", "split:high"],
    }
    assert no_hooks(model)


def test_replace_changes_the_rest_of_the_forward(model: Tiny) -> None:
    x = torch.randn(2, 3, 8, 8)
    scale = {"split:low": 3.0, "split:high": -1.0}
    taps = FeatureTaps(model, ["split"], replace=lambda name, t: t * scale[name])
    out = taps.run(x)
    stem = model.stem(x)
    expected = (stem * 3 * 2).mean() + (stem[:, :, ::2, ::2] * -1 + 1).mean()
    torch.testing.assert_close(out, expected)
    # The captured features are the originals, before replacement.
    torch.testing.assert_close(taps.features["split:low"], stem, rtol=0, atol=0)
    assert no_hooks(model)


def test_replace_with_wrong_shape_fails(model: Tiny) -> None:
    taps = FeatureTaps(model, ["stem"], replace=lambda name, t: t[:, :2])
    with pytest.raises(ValueError, match=r"replacement for level 'stem' must be a tensor of shape"):
        taps.run(torch.randn(1, 3, 8, 8))
    assert no_hooks(model)


def test_stop_skips_the_rest_of_the_forward(model: Tiny) -> None:
    taps = FeatureTaps(model, ["split", "stem"], stop=True)
    assert taps.run(torch.randn(1, 3, 8, 8)) is None
    assert model.head.calls == 0
    assert list(taps.features) == ["split:low", "split:high", "stem"]
    assert no_hooks(model)
    model(torch.randn(1, 3, 8, 8))
    assert model.head.calls == 1


def test_each_call_starts_a_fresh_capture(model: Tiny) -> None:
    taps = FeatureTaps(model, ["stem"])
    a, b = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    with taps:
        model(a)
        model(b)
    torch.testing.assert_close(taps.features["stem"], model.stem(b), rtol=0, atol=0)
    taps.clear()
    assert len(taps.features) == 0


def test_hooks_removed_when_the_forward_raises(model: Tiny) -> None:
    taps = FeatureTaps(model, ["stem"])
    with pytest.raises(RuntimeError), taps:
        model(torch.randn(1, 5, 8, 8))  # wrong channel count inside the conv
    assert no_hooks(model)


def test_layer_running_twice_fails() -> None:
    block = nn.Conv2d(2, 2, 1)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = block

        def forward(self, x: Tensor) -> Tensor:
            return self.block(self.block(x))

    with pytest.raises(RuntimeError, match="'block' ran twice"):
        FeatureTaps(Twice(), ["block"]).run(torch.randn(1, 2, 4, 4))


def test_unknown_layer_lists_close_names(model: Tiny) -> None:
    with pytest.raises(ValueError, match=r"unknown layer 'spilt'.*closest valid names: \['split'"):
        FeatureTaps(model, ["spilt"])
    with pytest.raises(ValueError, match="listed twice"):
        resolve_layers(model, ["stem", "stem"])
    with pytest.raises(TypeError, match="sequence of layer paths"):
        resolve_layers(model, "stem")
    with pytest.raises(ValueError, match="layers is empty"):
        resolve_layers(model, [])


def test_missing_layer_at_run_time() -> None:
    model = nn.ModuleDict({"used": nn.Identity(), "unused": nn.Identity()})
    model.forward = lambda x: model["used"](x)  # type: ignore[method-assign]
    taps = FeatureTaps(model, ["used", "unused"])
    with pytest.raises(RuntimeError, match=r"layers \['unused'\] of ModuleDict did not run"):
        taps.run(torch.randn(1, 3, 8, 8))
    assert no_hooks(model)


def test_flatten_and_rebuild_keep_structure() -> None:
    a, b = torch.ones(1), torch.zeros(1)
    assert [n for n, _ in flatten_output("p", (a, b))] == ["p:0", "p:1"]
    assert [n for n, _ in flatten_output("p", {"x": a})] == ["p:x"]
    rebuilt = rebuild_output(OrderedDict(x=a, y=b), [b, a])
    assert isinstance(rebuilt, OrderedDict) and list(rebuilt) == ["x", "y"]
    assert rebuilt["x"] is b
    assert isinstance(rebuild_output((a, b), [b, a]), tuple)
    assert isinstance(rebuild_output([a, b], [b, a]), list)
    with pytest.raises(TypeError, match="layer 'p' returned int"):
        flatten_output("p", 3)
    with pytest.raises(TypeError, match="level 'p:1' of layer 'p' is str"):
        flatten_output("p", [a, "no"])


def test_level_key_inverts_the_level_naming() -> None:
    a = torch.ones(1)
    # a layer path may itself hold ":" or share a prefix with another layer
    for path in ("backbone.fpn", "a:b", "backbone.fp"):
        for output in ({"0": a, "pool": a, "x:y": a}, [a, a, a]):
            names = [n for n, _ in flatten_output(path, output)]
            keys = list(output) if isinstance(output, dict) else ["0", "1", "2"]
            assert [level_key(path, n) for n in names] == keys
    with pytest.raises(
        ValueError, match="'backbone.fpn:0' is not a level name of layer 'backbone.fp'"
    ):
        level_key("backbone.fp", "backbone.fpn:0")
    with pytest.raises(ValueError, match="not a level name"):
        level_key("p", "p")  # a lone tensor's level has no key


def test_eval_mode_restores_each_flag(model: Tiny) -> None:
    model.train()
    model.stem[1].eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model.stem[0].training and not model.stem[1].training


def test_probe_levels_has_no_side_effects(model: Tiny) -> None:
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    feats, levels = probe_levels(model, ["split"], torch.randn(2, 3, 8, 8))
    assert levels == {"split": ["split:low", "split:high"]}
    assert feats["split:high"].shape == (2, 4, 4, 4)
    assert not feats["split:low"].requires_grad
    assert model.head.calls == 0
    assert model.training and model.stem[1].training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # The default input is one [1, 3, 128, 128] image.
    feats, _ = probe_levels(model, ["stem"])
    assert feats["stem"].shape == (1, 4, 128, 128)


def test_probe_levels_rejects_non_feature_maps(model: Tiny) -> None:
    with pytest.raises(ValueError, match=r"level 'head' must be a \[N, C, H, W\] feature map"):
        probe_levels(model, ["head"], torch.randn(1, 3, 8, 8))


def test_resized_batch_matches_the_detectors_own_transform(model: Tiny) -> None:
    from tiny_detectors import detection_batch, detector

    net = detector("retinanet", min_size=96).train()
    images, targets = detection_batch()
    rec = Recorder(net, {**resize_records(net), "fpn": Record("backbone.fpn")}, stop=True)
    assert rec.run(images, targets) is None and set(resize_records(net)) == {RESIZE}
    batch = resized_batch(rec)
    image_list, resized = net.transform(images, targets)
    assert batch is not None and batch.image_sizes == [tuple(s) for s in image_list.image_sizes]
    assert batch.image_sizes == [(76, 96), (76, 96)] and batch.padded == (96, 96)  # max_size 96
    for got, want in zip(batch.targets, resized, strict=True):
        torch.testing.assert_close(got["boxes"], want["boxes"], rtol=0, atol=0)
    assert not torch.equal(batch.targets[0]["boxes"], targets[0]["boxes"])  # really resized
    # Models without a detection transform have no such record.
    assert (
        resize_records(model) == {}
        and resized_batch(Recorder(model, {"s": Record("stem")})) is None
    )
