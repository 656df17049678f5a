"""Tests for maskd.distiller.Distiller (stage 2) on small torchvision models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.segmentation import (
    deeplabv3_mobilenet_v3_large,
    lraspp_mobilenet_v3_large,
)
from torchvision.ops import FrozenBatchNorm2d

from maskd.distiller import Distiller, total_loss
from maskd.learner import TokenLearner
from maskd.losses import masked_distillation_loss
from maskd.tasks import SegmentationTask
from maskd.terms import FitNetTerm, TermContext
from maskd.token_io import load_tokens, save_tokens
from maskd.tokens import ReceptiveTokens
from tiny_detectors import DETECTORS, detection_batch, snapshot
from tiny_detectors import detector as tiny_detector

FPN_LEVELS = {"fasterrcnn": ["0", "1", "2", "3", "pool"], "retinanet": ["0", "1", "2", "p6", "p7"]}
FPN_LEVELS["fcos"] = FPN_LEVELS["retinanet"]
FPN = "backbone.fpn"


def detector(
    kind: str, seed: int = 0, norm: type[nn.Module] = FrozenBatchNorm2d, min_size: int = 64
) -> nn.Module:
    """Students default to FrozenBatchNorm2d; teachers in these tests pass real BatchNorm."""
    return tiny_detector(kind, seed, norm, min_size)


def fpn_tokens(kind: str, num_tokens: int = 4, weighted: bool = True, seed: int = 7):
    torch.manual_seed(seed)
    group = [ReceptiveTokens(256, num_tokens, weighted) for _ in FPN_LEVELS[kind]]
    for tok in group:
        nn.init.normal_(tok.mask_token, std=0.2)  # masks far from a flat 0.5
    return {"backbone.fpn": group}


def maskd(
    tokens: object, student: str = "backbone.fpn", teacher: str | None = None, **options: object
) -> dict:
    """A maskd term spec (teacher layer: the student's unless given)."""
    return {"kind": "maskd", "student": student, "teacher": teacher or student,
            "tokens": tokens, **options}  # fmt: skip


def assert_unchanged(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"entry {key} changed"


def count_calls(modules: list[nn.Module]) -> list[int]:
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    for module in modules:
        module.register_forward_hook(hook)
    return calls


def heads(model: nn.Module) -> list[nn.Module]:
    return [model.rpn, model.roi_heads] if isinstance(model, FasterRCNN) else [model.head]


@pytest.mark.parametrize("kind", list(DETECTORS))
def test_detectors_teacher_frozen_and_never_runs_its_heads(kind: str) -> None:
    teacher = detector(kind, seed=0, norm=nn.BatchNorm2d)
    student = detector(kind, seed=1)
    tokens = fpn_tokens(kind)
    before = snapshot(teacher)
    distiller = Distiller(student, teacher, [maskd(tokens)]).train()
    (term,) = distiller.terms
    assert not any(m.training for m in teacher.modules())
    assert student.training
    teacher_heads, student_heads = count_calls(heads(teacher)), count_calls(heads(student))
    token_state = snapshot(term.loss)

    images, targets = detection_batch()
    opt = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        losses = distiller(images, targets)
        total_loss(losses).backward()
        assert all(p.grad is None for p in teacher.parameters())
        assert student.backbone.body.conv1.weight.grad.abs().sum() > 0
        assert all(a.weight.grad.abs().sum() > 0 for a in term.connectors)
        opt.step()
    assert "loss_maskd" in losses and float(losses["loss_maskd"].detach()) > 0
    assert teacher_heads[0] == 0
    assert student_heads[0] == 2 * len(heads(student))
    assert_unchanged(teacher, before)
    assert_unchanged(term.loss, token_state)
    assert [k for k in losses if "/" in k] == [f"maskd/backbone.fpn:{k}" for k in FPN_LEVELS[kind]]
    trainable = {n.split(".")[0] for n, p in distiller.named_parameters() if p.requires_grad}
    assert trainable == {"student", "terms"}
    assert all(
        ".connectors." in n for n, p in distiller.terms.named_parameters() if p.requires_grad
    )


def test_loss_matches_masked_distillation_on_features_captured_by_hand() -> None:
    teacher, student = detector("retinanet", seed=0), detector("retinanet", seed=1)
    tokens = fpn_tokens("retinanet")
    distiller = Distiller(student, teacher, [maskd(tokens, weight=2.0)]).train()
    images, targets = detection_batch()
    losses = distiller(images, targets)
    aligns = distiller.terms[0].connectors

    with torch.no_grad():
        t_feats = list(teacher.backbone(teacher.transform(images)[0].tensors).values())
    s_batch, _ = student.transform(images, targets)
    s_feats = list(student.backbone(s_batch.tensors).values())
    per_level = []
    for tok, align, s, t in zip(tokens["backbone.fpn"], aligns, s_feats, t_feats, strict=True):
        per_level.append(masked_distillation_loss(align(s), t, tok(t), tok.token_weights(t)))
    torch.testing.assert_close(losses["loss_maskd"], 2.0 * sum(per_level))
    levels = {k: v for k, v in losses.items() if k.startswith("maskd/")}
    for value, expected in zip(levels.values(), per_level, strict=True):
        torch.testing.assert_close(value, expected.detach())
    assert len(levels) == 5 and not any(v.requires_grad for v in levels.values())
    torch.testing.assert_close(
        total_loss(losses), sum(v for k, v in losses.items() if "/" not in k)
    )
    # Gradients reach the student through the aligned features as in the hand computation.
    conv = student.backbone.body.conv1.weight
    (got,) = torch.autograd.grad(losses["loss_maskd"], conv)
    (want,) = torch.autograd.grad(2.0 * sum(per_level), conv)
    torch.testing.assert_close(got, want)


def test_custom_mask_uses_aligned_student_feature_after_warmup() -> None:
    teacher, student = TinyTask((4, 6), seed=0), TinyTask((3, 5), seed=1)
    tok = ReceptiveTokens(6, 3, weighted=True)
    nn.init.normal_(tok.mask_token, std=0.5)
    distiller = Distiller(student, teacher, [maskd({"b": [tok]}, "b", custom_mask_warmup=1)])
    (term,) = distiller.terms
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        t = teacher.b(teacher.a(images))
    s = term.connectors[0](student.b(student.a(images)))
    plain = masked_distillation_loss(s, t, tok(t), tok.token_weights(t))
    custom = masked_distillation_loss(s, t, tok(t) * tok(s), tok.token_weights(t))
    assert not torch.allclose(plain, custom)
    torch.testing.assert_close(distiller(images)["loss_maskd"], plain)
    torch.testing.assert_close(distiller(images)["loss_maskd"], custom)
    assert term.loss.step == 2
    distiller.set_step(0)  # what DistillModule does before each step: optimizer steps
    torch.testing.assert_close(distiller(images)["loss_maskd"], plain)


class TinyTask(nn.Module):
    """Two strided convs and a head; returns a loss in training mode, logits in eval."""

    def __init__(self, widths: tuple[int, int] = (4, 8), seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1), nn.BatchNorm2d(widths[0]))
        self.b = nn.Conv2d(widths[0], widths[1], 3, 2, 1)
        self.head = nn.Conv2d(widths[1], 2, 1)

    def forward(self, images: Tensor, targets: Tensor | None = None) -> dict[str, Tensor] | Tensor:
        out = self.head(self.b(self.a(images)))
        return {"loss_task": out.pow(2).mean()} if self.training else out


def test_segmentation_levels_of_different_size_need_resize() -> None:
    torch.manual_seed(0)
    teacher = SegmentationTask(
        deeplabv3_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=3, aux_loss=True
        ),
        3,
    )
    student = SegmentationTask(
        lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3), 3
    )
    tokens = {"model.classifier.4": [ReceptiveTokens(3, 8)]}
    spec = maskd(tokens, "model.classifier", "model.classifier.4")
    dry = torch.zeros(2, 3, 64, 64)  # dry run at the training size: no new kernel shapes
    with pytest.raises(
        ValueError,
        match=r"maskd term: student level 'model.classifier' has spatial size \(8, 8\).*"
        r"teacher level 'model.classifier.4' has \(4, 4\).*resize to true",
    ):
        Distiller(student, teacher, [spec], example_input=dry)
    before = snapshot(teacher)
    spec.update(resize=True, eps=1e-5, weight=0.5)
    distiller = Distiller(student, teacher, [spec], example_input=dry)
    (term,) = distiller.terms
    g = torch.Generator().manual_seed(4)
    images = torch.randn(2, 3, 64, 64, generator=g)
    targets = torch.randint(0, 3, (2, 64, 64), generator=g)
    opt = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        losses = distiller(images, targets)
        assert set(losses) == {"loss_seg", "loss_maskd", "maskd/model.classifier.4"}
        total_loss(losses).backward()
        assert student.model.classifier.high_classifier.weight.grad.abs().sum() > 0
        opt.step()
    assert_unchanged(teacher, before)
    # By hand: the aligned student logits resized to the teacher's size. In training mode
    # BatchNorm normalises with batch statistics, so the student's output is reproducible.
    losses = distiller(images, targets)
    with torch.no_grad():
        t = teacher.model.classifier(teacher.model.backbone(images)["out"])
        s = student.model.classifier(student.model.backbone(images))
        s = F.interpolate(
            term.connectors[0](s), size=t.shape[-2:], mode="bilinear", align_corners=False
        )
        tok = term.loss.tokens[0]
        expected = 0.5 * masked_distillation_loss(s, t, tok(t), None, eps=1e-5)
    torch.testing.assert_close(losses["loss_maskd"].detach(), expected)


def test_level_count_mismatch_names_both_layers() -> None:
    teacher, student = detector("retinanet", 0), detector("retinanet", 1)
    with pytest.raises(
        ValueError,
        match=r"student layer 'backbone.body' has 3 levels .* teacher layer 'backbone.fpn' has 5",
    ):
        Distiller(student, teacher, [maskd(fpn_tokens("retinanet"), "backbone.body", FPN)])


def test_detection_transforms_must_resize_alike() -> None:
    teacher, student = detector("retinanet", 0, min_size=96), detector("retinanet", 1)
    with pytest.raises(ValueError, match=r"student level 'backbone.fpn:0' has spatial size"):
        Distiller(student, teacher, [maskd(fpn_tokens("retinanet"))])
    teacher = detector("retinanet", 0)
    distiller = Distiller(student, teacher, [maskd(fpn_tokens("retinanet"))])
    student.transform.min_size = (80,)
    images, targets = detection_batch()
    with pytest.raises(
        ValueError,
        match=r"resized the batch differently: student image sizes \[\(76, 96\), \(76, 96\)\]",
    ):
        distiller(images, targets)


class ContextSpy(FitNetTerm):
    """A FitNet term that keeps the context each level was given."""

    def __init__(self, student: str, teacher: str) -> None:
        super().__init__(student, teacher)
        self.seen: list[TermContext] = []

    def level_loss(self, s: Tensor, t: Tensor, index: int, ctx: TermContext) -> Tensor:
        self.seen.append(ctx)
        return super().level_loss(s, t, index, ctx)


def test_terms_get_the_students_resized_boxes_and_padded_size() -> None:
    teacher, student = detector("retinanet", 0, nn.BatchNorm2d), detector("retinanet", 1)
    for model in (teacher, student):
        model.transform.min_size = (96,)  # 64x80 images → 76x96 (max_size 96)
    spy = ContextSpy("backbone.fpn", "backbone.fpn")
    Distiller(student, teacher, [spy]).train()(*detection_batch())
    images, targets = detection_batch()
    image_list, resized = student.transform(images, targets)
    assert len(spy.seen) == 5 and all(ctx is spy.seen[0] for ctx in spy.seen)
    ctx = spy.seen[0]
    assert ctx.input_size == tuple(image_list.tensors.shape[-2:]) == (96, 96)
    assert ctx.boxes is not None and len(ctx.boxes) == 2
    for got, want, given in zip(ctx.boxes, resized, targets, strict=True):
        torch.testing.assert_close(got, want["boxes"], rtol=0, atol=0)
        torch.testing.assert_close(got, given["boxes"] * torch.tensor([1.2, 76 / 64, 1.2, 76 / 64]))
    # A model without a detection transform gives the terms no boxes.
    spy = ContextSpy("b", "b")
    Distiller(TinyTask(seed=1), TinyTask(seed=0), [spy]).train()(torch.rand(2, 3, 16, 16), None)
    assert spy.seen == [TermContext()]


def test_bad_terms_layers_and_tokens() -> None:
    teacher, student = TinyTask((4, 6), seed=0), TinyTask((3, 5), seed=1)
    tok6 = {"b": [ReceptiveTokens(6, 2)]}

    def build(tokens: object = tok6, s: str = "b", t: str = "b", **options: object) -> None:
        Distiller(student, teacher, [maskd(tokens, s, t, **options)])

    with pytest.raises(ValueError, match=r"unknown layer 'bb'.*closest valid names: \['b'"):
        build(s="bb")
    with pytest.raises(ValueError, match=r"unknown layer 'c'"):
        build(tok6["b"], t="c")
    with pytest.raises(TypeError, match="terms must be a list of distillation terms"):
        Distiller(student, teacher, maskd(tok6, "b"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="terms is empty"):
        Distiller(student, teacher, [])
    with pytest.raises(ValueError, match=r"no tokens for teacher layer 'b'; tokens cover \['a'\]"):
        build({"a": [ReceptiveTokens(4, 2)]})
    with pytest.raises(ValueError, match=r"no tokens for teacher layer 'a'; tokens cover \['b'\]"):
        build(tokens_from="a")
    with pytest.raises(ValueError, match=r"built for 5 channels but the level has 6"):
        build({"b": [ReceptiveTokens(5, 2)]})
    with pytest.raises(ValueError, match=r"has 1 levels \['b'\] but 2 token sets"):
        build({"b": [ReceptiveTokens(6, 2)] * 2})
    with pytest.raises(TypeError, match=r"tokens must be ReceptiveTokens per level or a mapping"):
        build("tokens.pt")
    with pytest.raises(
        ValueError, match=r"maskd term, b: align=false needs equal channels, but the student level "
        r"has 5 and the teacher level 6"
    ):  # fmt: skip
        build(align=False)
    with pytest.raises(
        ValueError, match=r"student level 'a' has spatial size \(64, 64\).*'b' has \(32, 32\)"
    ):
        build(s="a")
    with pytest.raises(ValueError, match=r"term names \['maskd'\] are used twice"):
        Distiller(student, teacher, [maskd(tok6, "b")] * 2)
    for option, value, err, message in [
        ("weight", -1.0, ValueError, r"maskd term: weight must be in \[0, inf\), got -1"),
        ("weight", "7", TypeError, "maskd term: weight must be a number, got '7'"),
        ("eps", float("nan"), ValueError, "maskd term: eps must be finite"),
        ("custom_mask_warmup", 1.5, TypeError, "custom_mask_warmup must be an integer"),
        ("level_weights", -0.4, ValueError, r"level_weights must be in \[0, inf\)"),
        ("level_weights", [1.0, 2.0], ValueError, "level_weights has 2 entries but there are 1"),
        ("name", "a/b", ValueError, "name must be a non-empty string without '/'"),
        ("resize", "yes", TypeError, "resize must be true or false"),
    ]:
        with pytest.raises(err, match=message):
            build(**{option: value})
    with pytest.raises(ValueError, match="different modules"):
        Distiller(teacher, teacher, [maskd(tok6, "b")])


def test_identity_align_and_untouched_caller_tokens() -> None:
    teacher, student = TinyTask((4, 6), seed=0), TinyTask((4, 6), seed=1)
    tok = ReceptiveTokens(6, 2)
    distiller = Distiller(student, teacher, [maskd({"b": [tok]}, "b", align=False)])
    (term,) = distiller.terms
    assert isinstance(term.connectors[0], nn.Identity)
    assert all(p.requires_grad for p in tok.parameters())  # the term froze its own copy
    assert not any(p.requires_grad for p in term.loss.parameters())
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        t = teacher.b(teacher.a(images))
    s = student.b(student.a(images))
    torch.testing.assert_close(
        distiller(images)["loss_maskd"], masked_distillation_loss(s, t, tok(t).detach())
    )


def test_eval_runs_only_the_student_and_state_dict_is_the_students() -> None:
    teacher, student = detector("retinanet", 0), detector("retinanet", 1)
    distiller = Distiller(student, teacher, [maskd(fpn_tokens("retinanet"))])
    images, targets = detection_batch()
    opt = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01)
    total_loss(distiller(images, targets)).backward()
    opt.step()

    teacher_calls = count_calls([teacher])
    distiller.eval()
    assert not any(m.training for m in distiller.modules())
    preds = distiller(images)
    assert teacher_calls[0] == 0

    state = distiller.student_state_dict()
    assert state.keys() == student.state_dict().keys()
    fresh = detector("retinanet", seed=5).eval()
    fresh.load_state_dict(state)
    again = fresh(images)
    for a, b in zip(preds, again, strict=True):
        torch.testing.assert_close(a["boxes"], b["boxes"])
        torch.testing.assert_close(a["scores"], b["scores"])
    distiller.train()
    assert student.training and not teacher.training


def test_learned_tokens_through_a_token_file(tmp_path) -> None:
    teacher, student = TinyTask((4, 6), seed=0), TinyTask((3, 5), seed=1)
    learner = TokenLearner(teacher, ["b"], num_tokens=3).train()
    images = torch.randn(2, 3, 16, 16)
    opt = torch.optim.Adam([p for p in learner.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        sum(learner(images).values()).backward()
        opt.step()
    path = save_tokens(tmp_path / "tokens.pt", learner.tokens())
    loaded = Distiller(student, teacher, [maskd(load_tokens(path), "b")])
    direct = Distiller(student, teacher, [maskd(learner.tokens(), "b")])
    direct.terms.load_state_dict(loaded.terms.state_dict())
    torch.testing.assert_close(loaded(images)["loss_maskd"], direct(images)["loss_maskd"])
    # Nothing stays hooked after a step.
    for model in (student, teacher):
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_auxiliary_logits_share_tokens_with_their_own_weight() -> None:
    """The authors' segmentation setting: the aux head's logits, same tokens, weight 0.4."""
    torch.manual_seed(0)

    def seg(seed: int) -> SegmentationTask:
        torch.manual_seed(seed)
        net = deeplabv3_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=3, aux_loss=True
        )
        return SegmentationTask(net, 3, aux_weight=0.4)

    teacher, student = seg(0), seg(1)
    for m in student.modules():  # the heads' dropout would make the by-hand pass differ
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    tok = ReceptiveTokens(3, 4)
    nn.init.normal_(tok.mask_token, std=0.5)
    main, aux = "model.classifier.4", "model.aux_classifier.4"
    tokens = {main: [tok]}  # the auxiliary logits take the main logits' tokens
    common = {"weight": 0.5, "eps": 1e-5}
    terms = [
        maskd(tokens, main, **common),
        maskd(tokens, aux, tokens_from=main, level_weights=0.4, name="maskd_aux", **common),
    ]
    distiller = Distiller(student, teacher, terms, example_input=torch.zeros(2, 3, 64, 64))
    g = torch.Generator().manual_seed(4)
    images = torch.randn(2, 3, 64, 64, generator=g)
    targets = torch.randint(0, 3, (2, 64, 64), generator=g)
    losses = distiller(images, targets)
    assert list(losses) == [
        "loss_seg", "loss_aux", "loss_maskd", f"maskd/{main}", "loss_maskd_aux", f"maskd_aux/{aux}"
    ]  # fmt: skip
    aligns = [term.connectors[0] for term in distiller.terms]
    with torch.no_grad():
        t_feats = teacher.model.backbone(images)
        t_main = teacher.model.classifier(t_feats["out"])
        t_aux = teacher.model.aux_classifier(t_feats["aux"])
        s_feats = student.model.backbone(images)
        s_main = aligns[0](student.model.classifier(s_feats["out"]))
        s_aux = aligns[1](student.model.aux_classifier(s_feats["aux"]))
        l_main = masked_distillation_loss(s_main, t_main, tok(t_main), None, eps=1e-5)
        l_aux = masked_distillation_loss(s_aux, t_aux, tok(t_aux), None, eps=1e-5)
    assert not torch.allclose(l_main, l_aux)
    torch.testing.assert_close(losses["loss_maskd"].detach(), 0.5 * l_main)
    torch.testing.assert_close(losses["loss_maskd_aux"].detach(), 0.5 * 0.4 * l_aux)
    torch.testing.assert_close(losses[f"maskd_aux/{aux}"], l_aux)


def test_checkpoint_of_the_earlier_layout_loads(tmp_path) -> None:
    """A state dict written when MasKD's align modules and loss sat on the Distiller itself
    (``align.<i>``, ``loss.tokens.<i>``, ``loss._extra_state``, over every pair's levels)."""
    teacher, student = TinyTask((4, 6), seed=0), TinyTask((3, 6), seed=1)
    tokens = {"a": [ReceptiveTokens(4, 2)], "b": [ReceptiveTokens(6, 2)]}
    terms = [maskd(tokens, "a"), maskd(tokens, "b", name="maskd_2"), {"kind": "fitnet",
             "student": "b", "teacher": "b", "name": "hint"}]  # fmt: skip
    written = Distiller(student, teacher, terms[:2], example_input=torch.zeros(1, 3, 16, 16))
    for term in written.terms:
        term.loss.step = 5
        nn.init.normal_(term.loss.tokens[0].mask_token)
    old = {}  # the same state under the earlier names
    for key, value in written.state_dict().items():
        if key.startswith("terms."):
            _, i, part, rest = key.split(".", 3)
            if part == "connectors":
                key = f"align.{i}.{rest.split('.', 1)[1]}"
            elif rest == "_extra_state":
                key = "loss._extra_state"
            else:
                key = f"loss.tokens.{i}.{rest.split('.', 2)[2]}"
        old[key] = value
    assert {"align.1.weight", "loss.tokens.1.mask_token", "loss._extra_state"} <= set(old)
    fresh = Distiller(student, teacher, terms[:2], example_input=torch.zeros(1, 3, 16, 16))
    fresh.load_state_dict(old)
    for a, b in zip(fresh.state_dict().values(), written.state_dict().values(), strict=True):
        assert torch.equal(a, b) if isinstance(a, Tensor) else a == b
    assert [t.loss.step for t in fresh.terms] == [5, 5]
    # MasKD beside a peer term: the earlier parameter order cannot be matched
    both = Distiller(student, teacher, terms, example_input=torch.zeros(1, 3, 16, 16))
    mixed = {**old, **{f"terms.0.{k}": v for k, v in both.terms[2].state_dict().items()}}
    with pytest.raises(ValueError, match="MasKD and peer terms together"):
        both.load_state_dict(mixed)
