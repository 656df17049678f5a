"""Token files: the project's own format and the two released MasKD checkpoint formats."""

from __future__ import annotations

import argparse

import pytest
import torch

from maskd import ReceptiveTokens, load_official_tokens, load_tokens, save_tokens


def _randomised(tok: ReceptiveTokens) -> ReceptiveTokens:
    with torch.no_grad():
        for p in tok.parameters():
            p.normal_()
    return tok


def _same(a: ReceptiveTokens, b: ReceptiveTokens) -> None:
    assert (a.channels, a.num_tokens, a.weighted) == (b.channels, b.num_tokens, b.weighted)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x = torch.randn(2, a.channels, 4, 5)
    assert torch.equal(a.mask_features(x), b.mask_features(x))


def test_own_format_round_trip(tmp_path):
    tokens = {
        "backbone.fpn": [_randomised(ReceptiveTokens(8, 6, weighted=True)) for _ in range(3)],
        "classifier.4": [_randomised(ReceptiveTokens(5, 2))],
    }
    path = save_tokens(tmp_path / "sub" / "tokens.pt", tokens)
    # Loadable with the safe unpickler only.
    torch.load(path, weights_only=True)
    back = load_tokens(path)
    assert list(back) == ["backbone.fpn", "classifier.4"]
    for layer in tokens:
        assert len(back[layer]) == len(tokens[layer])
        for a, b in zip(tokens[layer], back[layer], strict=True):
            _same(a, b)
    assert not list(tmp_path.glob("sub/.*.tmp"))


def test_own_format_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_tokens(tmp_path / "missing.pt")
    torch.save({"mask_token": torch.zeros(2, 3)}, tmp_path / "official.pt")
    with pytest.raises(ValueError, match="not a maskd token file.*load_official_tokens"):
        load_tokens(tmp_path / "official.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="garbage.pt"):
        load_tokens(tmp_path / "garbage.pt")
    with pytest.raises(TypeError, match="dict"):
        save_tokens(tmp_path / "x.pt", [ReceptiveTokens(2, 2)])
    with pytest.raises(TypeError, match=r"tokens\['a'\]\[0\]"):
        save_tokens(tmp_path / "x.pt", {"a": [torch.nn.Linear(2, 2)]})


def _official_detection_state(levels, t, c, weighted, prefix="distiller.mask_modules"):
    sd, expected = {}, []
    for lvl in range(levels):
        sd[f"{prefix}.{lvl}.mask_token"] = torch.randn(t, c)
        if weighted:
            sd[f"{prefix}.{lvl}.prob.0.weight"] = torch.randn(c, c, 3, 3)
            sd[f"{prefix}.{lvl}.prob.0.bias"] = torch.randn(c)
            sd[f"{prefix}.{lvl}.prob.2.weight"] = torch.randn(t, c, 1, 1)
            sd[f"{prefix}.{lvl}.prob.2.bias"] = torch.randn(t)
        expected.append(
            {k.split(f"{lvl}.", 1)[1]: v for k, v in sd.items() if k.startswith(f"{prefix}.{lvl}.")}
        )
    sd["student.backbone.conv1.weight"] = torch.randn(4, 3, 1, 1)  # unrelated keys are ignored
    return {"meta": {"epoch": 1}, "state_dict": sd}, expected


@pytest.mark.parametrize("weighted", [True, False])
def test_official_detection_checkpoint(tmp_path, weighted):
    ckpt, expected = _official_detection_state(5, 6, 16, weighted)
    # Levels stored out of order must come back in level order.
    ckpt["state_dict"] = dict(reversed(list(ckpt["state_dict"].items())))
    torch.save(ckpt, tmp_path / "det.pth")
    toks = load_official_tokens(tmp_path / "det.pth")
    assert len(toks) == 5
    for tok, exp in zip(toks, expected, strict=True):
        assert (tok.num_tokens, tok.channels, tok.weighted) == (6, 16, weighted)
        for k, v in exp.items():
            assert torch.equal(tok.state_dict()[k], v)
        x = torch.randn(1, 16, 3, 3)
        ref = torch.sigmoid(torch.einsum("tc,nchw->nthw", exp["mask_token"], x))
        assert torch.allclose(tok(x), ref)
        if weighted:
            h = torch.nn.functional.conv2d(x, exp["prob.0.weight"], exp["prob.0.bias"], padding=1)
            h = h.mean(dim=(2, 3), keepdim=True)
            w = torch.nn.functional.conv2d(h, exp["prob.2.weight"], exp["prob.2.bias"]).flatten(1)
            assert torch.allclose(tok.token_weights(x), w.softmax(1), atol=1e-6)
    # Also from an in-memory dict.
    assert len(load_official_tokens(ckpt)) == 5


def test_official_segmentation_checkpoint(tmp_path):
    token = torch.randn(8, 19)
    torch.save({"mask_token": token}, tmp_path / "seg.pth")
    (tok,) = load_official_tokens(tmp_path / "seg.pth")
    assert (tok.num_tokens, tok.channels, tok.weighted) == (8, 19, False)
    assert torch.equal(tok.mask_token, token)


def test_official_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_official_tokens(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="no MasKD tokens found.*conv.weight"):
        load_official_tokens({"state_dict": {"conv.weight": torch.zeros(1)}})
    with pytest.raises(ValueError, match=r"expected 'mask_token' of shape \[T, C\]"):
        load_official_tokens({"mask_token": torch.zeros(3)})
    bad, _ = _official_detection_state(2, 4, 8, True)
    bad["state_dict"]["distiller.mask_modules.1.prob.2.weight"] = torch.zeros(5, 8, 1, 1)
    with pytest.raises(ValueError, match="level 1"):
        load_official_tokens(bad)
    gap, _ = _official_detection_state(3, 4, 8, False)
    del gap["state_dict"]["distiller.mask_modules.1.mask_token"]
    with pytest.raises(ValueError, match="not contiguous"):
        load_official_tokens(gap)
    two, _ = _official_detection_state(1, 2, 4, False, prefix="a.mask_modules")
    other, _ = _official_detection_state(1, 2, 4, False, prefix="b.mask_modules")
    two["state_dict"].update(other["state_dict"])
    with pytest.raises(ValueError, match="several token sets"):
        load_official_tokens(two)
    assert len(load_official_tokens(two, prefix="b.")) == 1


def test_official_untrusted_pickle_is_refused(tmp_path):
    ckpt, _ = _official_detection_state(1, 2, 4, False)
    ckpt["meta"] = {"config": argparse.Namespace(lr=0.01)}  # what training frameworks often store
    torch.save(ckpt, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="trusted=True"):
        load_official_tokens(tmp_path / "pickled.pth")
    assert len(load_official_tokens(tmp_path / "pickled.pth", trusted=True)) == 1
