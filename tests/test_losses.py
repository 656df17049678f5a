"""Core losses against a literal implementation of METHOD.md's formulas (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from maskd import MasKDLoss, ReceptiveTokens, dice_diversity, masked_distillation_loss

torch.set_default_dtype(torch.float32)


# --- literal reference formulas (the ones that build [N, T, C, H, W]) -------------------------


def literal_loss(s, t, masks, weights=None, eps=0.0):
    """L[n,k,c] = Σ_p (m s − m t)² / Σ_p m, then weighted or plain mean (METHOD.md)."""
    m = masks.unsqueeze(2)  # [N, T, 1, H, W]
    ms = m * s.unsqueeze(1)  # [N, T, C, H, W]
    mt = m * t.detach().unsqueeze(1)
    num = ((ms - mt) ** 2).sum(dim=(-1, -2))  # [N, T, C]
    area = masks.sum(dim=(-1, -2)).unsqueeze(-1) + eps  # [N, T, 1]
    per = num / area
    if weights is None:
        return per.mean()
    per_n = (weights * per.mean(dim=2)).sum(dim=1)  # [N]
    return per_n.mean()


def literal_dice(masks, eps=1e-12):
    n, t = masks.shape[:2]
    total, pairs = 0.0, 0
    for b in range(n):
        for i in range(t):
            for j in range(t):
                if i == j:
                    continue
                mi, mj = masks[b, i], masks[b, j]
                d = 2 * (mi * mj).sum() / ((mi * mi).sum() + eps + (mj * mj).sum() + eps)
                total = total + d
                pairs += 1
    return total / pairs if pairs else masks.sum() * 0


def literal_mask_features(tok, x):
    masks = torch.sigmoid(torch.einsum("tc,nchw->nthw", tok.mask_token, x))
    if tok.weighted:
        w = tok.token_weights(x)
    else:
        w = torch.ones(x.shape[0], tok.num_tokens, dtype=x.dtype)
    full = masks.unsqueeze(2) * x.unsqueeze(1)  # [N, T, C, H, W]
    return (w[:, :, None, None, None] * full).sum(dim=1)


def rand(*shape, requires_grad=False):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=requires_grad)


def rel_close(a, b, tol=1e-10):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    scale = max(b.abs().max().item(), 1e-300)
    return (a - b).abs().max().item() <= tol * scale


SHAPES = [
    (2, 3, 4, 5, 7),  # N, T, C, H, W (non-square)
    (1, 1, 3, 6, 6),  # N = 1, T = 1
    (3, 6, 8, 4, 9),
    (1, 4, 2, 1, 5),
]


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_loss_value_and_grads_match_literal(shape, weighted):
    n, t, c, h, w = shape
    torch.manual_seed(0)
    s = rand(n, c, h, w, requires_grad=True)
    te = rand(n, c, h, w, requires_grad=True)
    masks = torch.rand(n, t, h, w, dtype=torch.float64).requires_grad_()
    weights = (
        torch.rand(n, t, dtype=torch.float64).softmax(1).requires_grad_() if weighted else None
    )

    ours = masked_distillation_loss(s, te, masks, weights, eps=1e-5)
    ref = literal_loss(s, te, masks, weights, eps=1e-5)
    assert ours.dtype == torch.float64
    assert rel_close(ours, ref)

    inputs = [s, masks] + ([weights] if weighted else [])
    g_ours = torch.autograd.grad(ours, inputs)
    g_ref = torch.autograd.grad(ref, inputs)
    for a, b in zip(g_ours, g_ref, strict=True):
        assert rel_close(a, b)


def test_no_gradient_into_teacher():
    s = rand(2, 4, 3, 3, requires_grad=True)
    t = rand(2, 4, 3, 3, requires_grad=True)
    masks = torch.rand(2, 3, 3, 3, dtype=torch.float64)
    loss = masked_distillation_loss(s, t, masks)
    loss.backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_gradcheck_loss_and_mask_features():
    torch.manual_seed(1)
    s = rand(2, 3, 4, 5, requires_grad=True)
    t = rand(2, 3, 4, 5)
    masks = torch.rand(2, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, m, w: masked_distillation_loss(a, t, m, w), (s, masks, weights)
    )
    assert torch.autograd.gradcheck(lambda a, m: masked_distillation_loss(a, t, m), (s, masks))

    for weighted in (False, True):
        tok = ReceptiveTokens(3, 4, weighted=weighted).double()
        with torch.no_grad():
            tok.mask_token.normal_(0, 0.5)
        x = rand(2, 3, 4, 5, requires_grad=True)
        assert torch.autograd.gradcheck(tok.mask_features, (x,))
        token = tok.mask_token.detach().clone().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda k, x=x, tok=tok: _features_wrt_token(tok, k, x.detach()), (token,)
        )


def _features_wrt_token(tok, token, x):
    return torch.func.functional_call(tok, {"mask_token": token}, (x,), strict=False)


@pytest.mark.parametrize("weighted", [False, True])
def test_mask_features_matches_literal(weighted):
    torch.manual_seed(2)
    tok = ReceptiveTokens(5, 3, weighted=weighted).double()
    with torch.no_grad():
        tok.mask_token.normal_(0, 1.0)
    x = rand(2, 5, 6, 4, requires_grad=True)
    ours = tok.mask_features(x)
    ref = literal_mask_features(tok, x)
    assert rel_close(ours, ref)
    g1 = torch.autograd.grad(ours.square().sum(), [x, tok.mask_token])
    g2 = torch.autograd.grad(ref.square().sum(), [x, tok.mask_token])
    for a, b in zip(g1, g2, strict=True):
        assert rel_close(a, b)


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 6, 3, 3), (3, 1, 4, 4), (2, 2, 1, 7)])
def test_dice_matches_literal(shape):
    torch.manual_seed(3)
    masks = torch.rand(*shape, dtype=torch.float64, requires_grad=True)
    ours = dice_diversity(masks)
    ref = literal_dice(masks)
    assert rel_close(ours, ref)
    if shape[1] > 1:
        assert rel_close(torch.autograd.grad(ours, masks)[0], torch.autograd.grad(ref, masks)[0])
    else:
        assert ours.item() == 0.0


def test_dice_single_token_and_zero_masks_are_finite():
    assert dice_diversity(torch.rand(2, 1, 3, 3)).item() == 0.0
    zero = torch.zeros(2, 3, 4, 4, requires_grad=True)
    d = dice_diversity(zero)
    d.backward()
    assert torch.isfinite(d) and torch.isfinite(zero.grad).all()


def test_dice_identical_tokens_is_one_and_disjoint_is_zero():
    m = torch.rand(1, 1, 4, 4).expand(2, 3, 4, 4)
    assert abs(dice_diversity(m).item() - 1.0) < 1e-6
    disjoint = torch.zeros(1, 2, 2, 2)
    disjoint[0, 0, 0] = 1
    disjoint[0, 1, 1] = 1
    assert dice_diversity(disjoint).item() == 0.0


# --- MasKDLoss --------------------------------------------------------------------------------


def make_tokens(channels, num_tokens=3, weighted=True):
    torch.manual_seed(4)
    toks = [ReceptiveTokens(c, num_tokens, weighted=weighted).double() for c in channels]
    for tok in toks:
        with torch.no_grad():
            tok.mask_token.normal_(0, 0.5)
    return toks


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("warmup", [None, 0, 2])
def test_maskd_loss_matches_literal_over_levels(weighted, warmup):
    toks = make_tokens([4, 6], weighted=weighted)
    crit = MasKDLoss(toks, loss_weight=2.5, custom_mask_warmup=warmup).train()
    shapes = [(2, 4, 5, 7), (2, 6, 3, 2)]
    for step in range(4):
        s = [rand(*sh, requires_grad=True) for sh in shapes]
        t = [rand(*sh) for sh in shapes]
        total, levels = crit(s, t, return_levels=True)
        ref = 0.0
        for tok, si, ti, name in zip(toks, s, t, ["0", "1"], strict=True):
            m = torch.sigmoid(torch.einsum("tc,nchw->nthw", tok.mask_token.detach(), ti))
            if warmup is not None and step >= warmup:
                m = m * torch.sigmoid(
                    torch.einsum("tc,nchw->nthw", tok.mask_token.detach(), si.detach())
                )
            w = tok.token_weights(ti).detach() if weighted else None
            lvl = literal_loss(si, ti, m, w)
            assert rel_close(levels[name], lvl)
            ref = ref + lvl
        ref = 2.5 * ref
        assert rel_close(total, ref)
        g1 = torch.autograd.grad(total, s)
        g2 = torch.autograd.grad(ref, s)
        for a, b in zip(g1, g2, strict=True):
            assert rel_close(a, b)
    assert crit.step == 4


def test_maskd_loss_tokens_frozen_and_not_in_optimizer():
    toks = make_tokens([4])
    crit = MasKDLoss({"p3": toks[0]})
    assert all(not p.requires_grad for p in crit.parameters())
    s = rand(1, 4, 3, 3, requires_grad=True)
    loss = crit({"p3": s}, {"p3": rand(1, 4, 3, 3)})
    loss.backward()
    assert all(p.grad is None for p in crit.parameters())
    opt = torch.optim.SGD([p for p in crit.parameters() if p.requires_grad] or [s], lr=1.0)
    before = toks[0].mask_token.clone()
    opt.step()
    assert torch.equal(before, toks[0].mask_token)


def test_maskd_loss_step_in_state_dict_and_eval_does_not_count():
    toks = make_tokens([4])
    crit = MasKDLoss(toks, custom_mask_warmup=3)
    feats = [rand(1, 4, 3, 3)]
    for _ in range(5):
        crit(feats, feats)
    crit.eval()
    crit(feats, feats)
    assert crit.step == 5
    sd = crit.state_dict()
    fresh = MasKDLoss(make_tokens([4]), custom_mask_warmup=3)
    assert fresh.step == 0 and not fresh.custom_mask_active
    fresh.load_state_dict(sd)
    assert fresh.step == 5 and fresh.custom_mask_active
    assert torch.equal(fresh.tokens[0].mask_token, toks[0].mask_token)


def test_maskd_loss_bad_inputs():
    toks = make_tokens([4, 6])
    crit = MasKDLoss(toks)
    a = [rand(1, 4, 3, 3), rand(1, 6, 2, 2)]
    with pytest.raises(ValueError, match="has 1 feature maps, expected 2"):
        crit(a[:1], a)
    with pytest.raises(ValueError, match="same shape"):
        crit([rand(1, 4, 3, 4), a[1]], a)
    with pytest.raises(ValueError, match="built for 4"):
        crit([rand(1, 5, 3, 3), a[1]], [rand(1, 5, 3, 3), a[1]])
    with pytest.raises(TypeError, match="sequence"):
        crit({"0": a[0]}, a)
    keyed = MasKDLoss({"a": toks[0]})
    with pytest.raises(ValueError, match="keys"):
        keyed({"b": a[0]}, {"b": a[0]})
    with pytest.raises(ValueError, match="empty"):
        MasKDLoss([])
    with pytest.raises(TypeError, match="ReceptiveTokens"):
        MasKDLoss([torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="custom_mask_warmup"):
        MasKDLoss(toks, custom_mask_warmup=-1)


# --- bad inputs, fuzzed ---------------------------------------------------------------------


dims = st.integers(min_value=1, max_value=5)


@settings(max_examples=40, deadline=None)
@given(n=dims, t=dims, c=dims, h=dims, w=dims, weighted=st.booleans())
def test_fuzz_valid_shapes_match_literal(n, t, c, h, w, weighted):
    gen = torch.Generator().manual_seed(n * 1000 + t * 100 + c * 10 + h + w)
    s = torch.randn(n, c, h, w, dtype=torch.float64, generator=gen)
    te = torch.randn(n, c, h, w, dtype=torch.float64, generator=gen)
    masks = torch.rand(n, t, h, w, dtype=torch.float64, generator=gen)
    weights = torch.rand(n, t, dtype=torch.float64, generator=gen) if weighted else None
    assert rel_close(
        masked_distillation_loss(s, te, masks, weights), literal_loss(s, te, masks, weights)
    )
    assert rel_close(dice_diversity(masks), literal_dice(masks))


@settings(max_examples=40, deadline=None)
@given(
    s_shape=st.lists(dims, min_size=1, max_size=5),
    t_shape=st.lists(dims, min_size=1, max_size=5),
    m_shape=st.lists(dims, min_size=1, max_size=5),
    w_shape=st.lists(dims, min_size=1, max_size=3),
)
def test_fuzz_bad_shapes_raise_clear_errors(s_shape, t_shape, m_shape, w_shape):
    s, t, m, w = (torch.rand(*x) for x in (s_shape, t_shape, m_shape, w_shape))
    ok = (
        len(s_shape) == 4
        and s_shape == t_shape
        and len(m_shape) == 4
        and m_shape[0] == s_shape[0]
        and m_shape[2:] == s_shape[2:]
        and w_shape == m_shape[:2]
    )
    if ok:
        assert torch.isfinite(masked_distillation_loss(s, t, m, w))
    else:
        with pytest.raises(ValueError, match=r"student|teacher|masks|weights"):
            masked_distillation_loss(s, t, m, w)


def test_bad_types_and_dtypes():
    x = torch.rand(1, 2, 3, 3)
    with pytest.raises(TypeError, match="student must be a torch.Tensor"):
        masked_distillation_loss([1.0], x, x)
    with pytest.raises(TypeError, match="floating-point"):
        masked_distillation_loss(x.long(), x.long(), x)
    with pytest.raises(TypeError, match="weights must be a torch.Tensor"):
        masked_distillation_loss(x, x, torch.rand(1, 4, 3, 3), weights=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="masks must be 4-D"):
        dice_diversity(torch.rand(3, 3))


def test_tokens_reject_wrong_channels_and_args():
    tok = ReceptiveTokens(4, 2)
    with pytest.raises(ValueError, match="3 channels but these tokens were built for 4"):
        tok(torch.rand(1, 3, 2, 2))
    with pytest.raises(ValueError, match="x must be 4-D"):
        tok(torch.rand(4, 2, 2))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="channels"):
            ReceptiveTokens(bad, 2)
        with pytest.raises(ValueError, match="num_tokens"):
            ReceptiveTokens(3, bad)


def test_token_init_statistics():
    torch.manual_seed(5)
    tok = ReceptiveTokens(256, 64, weighted=True)
    assert abs(tok.mask_token.std().item() - 0.01) < 0.001
    conv3, conv1 = tok.prob[0], tok.prob[2]
    assert abs(conv3.weight.std().item() - (2 / (9 * 256)) ** 0.5) < 0.002
    assert abs(conv1.weight.std().item() - (2 / 64) ** 0.5) < 0.02
    assert conv3.bias.abs().sum() == 0 and conv1.bias.abs().sum() == 0
    x = torch.randn(2, 256, 5, 5)
    w = tok.token_weights(x)
    assert w.shape == (2, 64) and torch.allclose(w.sum(1), torch.ones(2))
    m = tok(x)
    assert m.shape == (2, 64, 5, 5) and (m > 0).all() and (m < 1).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_at_coco_scale_accumulates_in_float32(dtype):
    # P2 of an 800x1333 image; values large enough that a float16 sum would overflow.
    torch.manual_seed(6)
    n, c, h, w = 1, 64, 200, 336
    s32 = torch.randn(n, c, h, w) * 30
    t32 = torch.randn(n, c, h, w) * 30
    masks = torch.rand(n, 6, h, w)
    ref = masked_distillation_loss(s32.to(dtype).double(), t32.to(dtype).double(), masks.double())
    s = s32.to(dtype).requires_grad_()
    ours = masked_distillation_loss(s, t32.to(dtype), masks.to(dtype))
    assert ours.dtype == torch.float32
    assert torch.isfinite(ours)
    assert abs(ours.item() - ref.item()) / ref.item() < 1e-2
    ours.backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad).all()
    d = dice_diversity(masks.to(dtype))
    assert torch.isfinite(d) and abs(d.item() - dice_diversity(masks.double()).item()) < 1e-2


def test_under_autocast_cpu_bfloat16():
    tok = ReceptiveTokens(8, 3, weighted=True)
    crit = MasKDLoss([tok])
    s = torch.randn(2, 8, 16, 16, requires_grad=True)
    t = torch.randn(2, 8, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = crit([s], [t])
    ref = MasKDLoss([copy.deepcopy(tok).double()])([s.double()], [t.double()])
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) / ref.item() < 2e-2


@pytest.mark.parametrize("weighted", [False, True])
def test_mask_features_low_precision_and_channels_last(weighted):
    """bfloat16 features, float32 features under autocast, and channels_last memory."""
    torch.manual_seed(11)
    tok = ReceptiveTokens(16, 4, weighted=weighted)
    with torch.no_grad():
        tok.mask_token.normal_(0, 0.3)
    x32 = torch.randn(2, 16, 40, 56) * 4
    ref_tok = copy.deepcopy(tok).double()
    x64 = x32.to(torch.bfloat16).double().requires_grad_()
    ref_out, ref_masks = ref_tok.mask_features(x64, return_masks=True)
    (ref_out.sum() + ref_masks.square().sum()).backward()

    x = x32.to(torch.bfloat16).requires_grad_()
    out, masks = copy.deepcopy(tok).to(torch.bfloat16).mask_features(x, return_masks=True)
    (out.float().sum() + masks.float().square().sum()).backward()
    assert out.dtype == masks.dtype == x.grad.dtype == torch.bfloat16
    scale = ref_out.abs().max().item()
    assert (out.double() - ref_out).abs().max().item() < 0.05 * scale
    assert (x.grad.double() - x64.grad).abs().max().item() < 0.05 * x64.grad.abs().max().item()

    for layout in (torch.contiguous_format, torch.channels_last):
        xa = x32.clone().to(memory_format=layout).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_a = tok.mask_features(xa)
        out_a.sum().backward()
        assert out_a.shape == xa.shape and torch.isfinite(out_a).all()
        assert torch.isfinite(xa.grad).all()
        assert (out_a.double() - ref_tok.mask_features(x32.double())).abs().max() < 0.05 * scale


def test_backward_twice_through_retained_graph():
    torch.manual_seed(7)
    s = rand(2, 3, 4, 5, requires_grad=True)
    t = rand(2, 3, 4, 5)
    masks = torch.rand(2, 2, 4, 5, dtype=torch.float64)
    loss = masked_distillation_loss(s, t, masks)
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    loss.backward()
    ref = torch.autograd.grad(literal_loss(s, t, masks), s)[0]
    assert rel_close(first, ref)
    assert rel_close(s.grad, 2 * ref)


def test_mask_that_underflowed_to_zero_contributes_nothing():
    # Large teacher features drive a token's logits below -104, where sigmoid is exactly 0.
    torch.manual_seed(8)
    tok = ReceptiveTokens(4, 3)
    with torch.no_grad():
        tok.mask_token.copy_(torch.tensor([[-1.0] * 4, [0.1] * 4, [0.2, -0.1, 0.3, 0.0]]))
    t = torch.rand(2, 4, 5, 5) * 100 + 100
    masks = tok(t)
    assert (masks[:, 0] == 0).all()
    s = torch.randn(2, 4, 5, 5, requires_grad=True)
    loss = masked_distillation_loss(s, t, masks)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    # The zero token's term is 0; the others are the literal formula (mean over all T tokens).
    ref = literal_loss(s.double(), t.double(), masks[:, 1:].double()) * (2 / 3)
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()


@pytest.mark.parametrize("x_needs_grad", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_mask_features_with_masks_matches_literal(weighted, x_needs_grad):
    """Stage 1 uses both outputs (masked feature and masks for Dice): one fused backward."""
    torch.manual_seed(9)
    tok = ReceptiveTokens(5, 3, weighted=weighted).double()
    with torch.no_grad():
        tok.mask_token.normal_(0, 1.0)
    x = rand(2, 5, 4, 6, requires_grad=x_needs_grad)
    out, masks = tok.mask_features(x, return_masks=True)
    ref_masks = torch.sigmoid(torch.einsum("tc,nchw->nthw", tok.mask_token, x))
    ref_out = literal_mask_features(tok, x)
    assert masks.shape == (2, 3, 4, 6)
    assert rel_close(masks, ref_masks) and rel_close(out, ref_out)
    wrt = [*([x] if x_needs_grad else []), *tok.parameters()]
    g1 = torch.autograd.grad(out.square().sum() + literal_dice(masks), wrt)
    g2 = torch.autograd.grad(ref_out.square().sum() + literal_dice(ref_masks), wrt)
    for a, b in zip(g1, g2, strict=True):
        assert rel_close(a, b)
    # Only one output used: the other's gradient is absent, not zero-filled wrongly.
    ref_masks = torch.sigmoid(torch.einsum("tc,nchw->nthw", tok.mask_token, x))
    g1 = torch.autograd.grad(
        literal_dice(tok.mask_features(x, True)[1]), wrt, allow_unused=True, materialize_grads=True
    )
    g2 = torch.autograd.grad(
        literal_dice(ref_masks), wrt, allow_unused=True, materialize_grads=True
    )
    for a, b in zip(g1, g2, strict=True):
        assert rel_close(a, b)


def test_gradcheck_fused_outputs_and_masks():
    torch.manual_seed(10)
    for weighted in (False, True):
        tok = ReceptiveTokens(3, 2, weighted=weighted).double()
        with torch.no_grad():
            tok.mask_token.normal_(0, 0.5)
        x = rand(2, 3, 3, 4, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, tok=tok: tok.mask_features(a, True), (x,))
        assert torch.autograd.gradcheck(tok, (x,))


def test_level_weights_scale_each_feature_map():
    torch.manual_seed(12)
    toks = [ReceptiveTokens(4, 3).double(), ReceptiveTokens(4, 2, weighted=True).double()]
    s = [rand(2, 4, 5, 6), rand(2, 4, 3, 3)]
    t = [rand(2, 4, 5, 6), rand(2, 4, 3, 3)]
    ref = [
        literal_loss(si, ti, tok(ti), tok.token_weights(ti), eps=1e-5)
        for tok, si, ti in zip(toks, s, t, strict=True)
    ]
    crit = MasKDLoss(toks, loss_weight=0.5, eps=1e-5, level_weights=[1.0, 0.4])
    assert rel_close(crit(s, t), 0.5 * (ref[0] + 0.4 * ref[1]))
    keyed = MasKDLoss({"a": toks[0], "b": toks[1]}, eps=1e-5, level_weights={"b": 0.0})
    assert rel_close(keyed({"a": s[0], "b": s[1]}, {"a": t[0], "b": t[1]}), ref[0])
    with pytest.raises(ValueError, match="level_weights has 1 entries but there are 2 levels"):
        MasKDLoss(toks, level_weights=[1.0])
    with pytest.raises(ValueError, match=r"level_weights\['1'\] must be finite, got nan"):
        MasKDLoss(toks, level_weights=[1.0, float("nan")])
    with pytest.raises(ValueError, match=r"level_weights\['0'\] must be in \[0, inf\), got -1"):
        MasKDLoss(toks, level_weights=[-1, 1.0])
    with pytest.raises(TypeError, match=r"level_weights\['1'\] must be a number, got '1'"):
        MasKDLoss(toks, level_weights=[1.0, "1"])
    with pytest.raises(ValueError, match=r"unknown levels \['c'\]"):
        MasKDLoss({"a": toks[0], "b": toks[1]}, level_weights={"c": 1.0})
