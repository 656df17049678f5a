"""Tests for maskd.recorder: one recorder for outputs, inputs and arguments of named layers."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import Tensor, nn

from maskd.recorder import Record, Recorder
from tiny_models import Counted, Tiny


@pytest.fixture
def model() -> Tiny:
    torch.manual_seed(0)
    return Tiny(scale=0.5)


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def exact(a: Tensor, b: Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_output_input_and_pre_records_match_direct_calls(model: Tiny) -> None:
    x = torch.randn(2, 3, 8, 8)
    rec = Recorder(
        model,
        {
            "stem": Record("stem"),
            "conv_in": Record("stem.0", "input"),
            "merge_args": Record("merge", "pre"),
            "head_in": Record("head", "input"),
            "out": Record("head"),
        },
    )
    with rec:
        out = model(x)
    assert no_hooks(model)
    # Direct calls of the submodules, one after the other.
    stem = model.stem(x)
    split = model.split(stem)
    merged = model.merge(split, 0.5)
    exact(rec["stem"], stem)
    assert rec["conv_in"] is x
    args = rec["merge_args"]
    assert isinstance(args, tuple) and len(args) == 2 and args[1] == 0.5
    exact(args[0]["low"], split["low"])
    exact(args[0]["high"], split["high"])
    assert isinstance(rec["head_in"], tuple)
    for got, want in zip(rec["head_in"], merged, strict=True):
        exact(got, want)
    exact(rec["out"], model.head(merged))
    exact(rec["out"], out)
    assert rec.missing() == [] and "out" in rec


def test_dict_output_keeps_its_structure(model: Tiny) -> None:
    x = torch.randn(1, 3, 8, 8)
    rec = Recorder(model, {"fpn": Record("split")})
    with rec:
        model(x)
    fpn = rec["fpn"]
    assert type(fpn) is OrderedDict and list(fpn) == ["low", "high"]
    stem = model.stem(x)
    exact(fpn["low"], stem)
    exact(fpn["high"], stem[:, :, ::2, ::2])


def test_replace_output_input_and_args_reach_the_rest_of_the_forward(model: Tiny) -> None:
    x = torch.randn(2, 3, 8, 8)

    def scale_low(feats: OrderedDict[str, Tensor]) -> OrderedDict[str, Tensor]:
        return OrderedDict(low=feats["low"] * 3.0, high=feats["high"])

    rec = Recorder(model, {"fpn": Record("split", replace=scale_low)})
    with rec:
        out = model(x)
    stem = model.stem(x)
    expected = (stem * 3.0 * 2 * 0.5).mean() + (stem[:, :, ::2, ::2] + 1).mean()
    torch.testing.assert_close(out, expected)
    exact(rec["fpn"]["low"], stem)  # the record keeps the original

    # The first argument, and the whole argument tuple.
    rec = Recorder(model, {"x": Record("stem", "input", replace=lambda t: -t)})
    with rec:
        out = model(x)
    exact(rec["x"], x)
    torch.testing.assert_close(out, Tiny.forward(model, -x))
    rec = Recorder(model, {"args": Record("merge", "pre", replace=lambda a: (a[0], 4.0))})
    with rec:
        out = model(x)
    expected = (stem * 2 * 4.0).mean() + (stem[:, :, ::2, ::2] + 1).mean()
    torch.testing.assert_close(out, expected)
    assert no_hooks(model)


def test_stop_ends_the_forward_quietly_after_the_last_record(model: Tiny) -> None:
    merge_calls = [0]

    def count(*_: object) -> None:
        merge_calls[0] += 1

    counter = model.merge.register_forward_pre_hook(count)
    x = torch.randn(1, 3, 8, 8)
    rec = Recorder(model, {"fpn": Record("split"), "stem": Record("stem")}, stop=True)
    reached = False
    with rec:
        model(x)
        reached = True  # never: the forward stopped inside the block
    assert not reached and rec.stopped
    assert model.head.calls == 0 and merge_calls[0] == 0
    exact(rec["stem"], model.stem(x))
    # A pre record stops before its own module runs.
    rec = Recorder(model, {"args": Record("head", "input")}, stop=True)
    with rec:
        model(x)
    assert rec.stopped and model.head.calls == 0 and merge_calls[0] == 1
    # run() registers the hooks for one call: the model's output, or None once stopped.
    assert rec.run(x) is None and rec.stopped and no_hooks(model.head)
    full = Recorder(model, {"stem": Record("stem")})
    exact(full.run(x), Tiny.forward(model, x))
    assert not full.stopped and model.head.calls == 2
    # Without stop, or once the hooks are gone, the whole model runs.
    model(x)
    assert model.head.calls == 3
    counter.remove()
    assert no_hooks(model)


def test_nested_recorders_and_hooks_removed_also_after_an_exception(model: Tiny) -> None:
    x = torch.randn(1, 3, 8, 8)
    outer = Recorder(model, {"stem": Record("stem"), "out": Record("head")})
    inner = Recorder(model, {"fpn": Record("split")}, stop=True)
    with outer:
        with inner:
            model(x)
        assert not inner.active and outer.active
        assert "stem" in outer and "out" not in outer  # the inner stop cut the forward
        out = model(x)  # a new call: outer starts afresh, inner is gone
        exact(outer["out"], out)
    assert no_hooks(model)
    # The outer recorder's stop passes through an inner block that does not own it.
    outer = Recorder(model, {"stem": Record("stem")}, stop=True)
    inner = Recorder(model, {"out": Record("head")})
    with outer, inner:
        model(x)
    assert outer.stopped and "out" not in inner and no_hooks(model)
    with pytest.raises(RuntimeError, match="already active"), outer, outer:
        pass
    assert no_hooks(model)
    # A failing forward leaves no hook behind, and the error reaches the caller.
    with pytest.raises(RuntimeError), Recorder(model, {"stem": Record("stem")}, stop=True):
        model(torch.randn(1, 5, 8, 8))  # wrong channel count inside the conv
    assert no_hooks(model)


def test_each_call_starts_afresh_and_values_outlive_the_block(model: Tiny) -> None:
    a, b = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    rec = Recorder(model, {"stem": Record("stem")})
    with rec:
        model(a)
        model(b)
    exact(rec["stem"], model.stem(b))
    rec.clear()
    assert "stem" not in rec and rec.missing() == ["stem"]
    with pytest.raises(RuntimeError, match=r"record 'stem' \(output of layer 'stem'\) was not"):
        rec["stem"]
    with pytest.raises(KeyError, match=r"no record 'fpn'; records: \['stem'\]"):
        rec["fpn"]


def test_layer_running_twice_fails() -> None:
    block = nn.Conv2d(2, 2, 1)
    model = nn.Sequential(block, block)
    rec = Recorder(model, {"b": Record("0")})
    with pytest.raises(RuntimeError, match="layer '0' ran twice in one forward"), rec:
        model(torch.randn(1, 2, 4, 4))
    assert no_hooks(model)


def test_bad_records_fail_at_construction(model: Tiny) -> None:
    with pytest.raises(ValueError, match=r"unknown layer 'spilt' in Tiny; closest valid names: \["):
        Recorder(model, {"x": Record("spilt")})
    with pytest.raises(
        ValueError, match=r"one of \['output', 'input', 'pre', 'return'\].*'outputs'"
    ):
        Record("stem", "outputs")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="replace must be callable"):
        Record("stem", replace=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="record 'x' must be a maskd.recorder.Record"):
        Recorder(model, {"x": "stem"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="non-empty mapping"):
        Recorder(model, {})
    assert no_hooks(model)


class Scored(nn.Linear):
    def score(self, x: Tensor) -> Tensor:
        return self(x).softmax(-1)


class WithMethod(nn.Module):
    """A forward that calls a plain method of a sub-module (as torchvision's RoI heads do)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = Scored(4, 3)
        self.after = Counted()

    def forward(self, x: Tensor) -> Tensor:
        scores = self.head.score(x)
        return self.after((scores, scores))


def test_method_return_is_recorded_replaced_and_unwrapped() -> None:
    torch.manual_seed(0)
    model = WithMethod()
    x = torch.randn(2, 4)
    want = model.head(x).softmax(-1)
    rec = Recorder(model, {"s": Record("head.score", what="return")})
    with rec:
        out = model(x)
    torch.testing.assert_close(rec["s"], want, rtol=0, atol=0)
    torch.testing.assert_close(out, 2 * want.mean(), rtol=0, atol=0)
    assert "score" not in vars(model.head)  # the instance is as it was
    doubled = Recorder(model, {"s": Record("head.score", what="return", replace=lambda v: 2 * v)})
    torch.testing.assert_close(doubled.run(x), 4 * want.mean(), rtol=0, atol=0)
    torch.testing.assert_close(doubled["s"], want, rtol=0, atol=0)  # the original is kept
    stop = Recorder(model, {"s": Record("head.score", what="return")}, stop=True)
    calls = model.after.calls
    assert stop.run(x) is None and model.after.calls == calls and stop.stopped
    model.head.score = lambda v: v  # an instance attribute is put back, not deleted
    with Recorder(model, {"s": Record("head.score", what="return")}):
        pass
    assert vars(model.head)["score"](3) == 3
    with pytest.raises(ValueError, match=r"record 'm': Scored at 'head' has no method 'nope'"):
        Recorder(model, {"m": Record("head.nope", what="return")})
    with pytest.raises(ValueError, match="unknown layer 'heads'"):
        Recorder(model, {"m": Record("heads.score", what="return")})
