"""``OutputCache`` and the distiller's ``teacher_cache``: a frozen layer answers from memory for
samples it has seen, with the values it computes for each sample alone."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maskd import Distiller, ReceptiveTokens, total_loss
from maskd.output_cache import OutputCache, sample_key


class Trunk(nn.Module):
    """Two-level conv trunk (dict output) that counts the samples it computes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.computed = 0

    def forward(self, x):
        self.computed += x.shape[0]
        a = torch.relu(self.a(x))
        return OrderedDict([("p1", a), ("p2", self.b(a))])


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_seen_samples_are_served_with_what_each_computes_alone() -> None:
    trunk = Trunk().eval()
    alone = [trunk(x[None]) for x in images(4)]
    batched = trunk(images(4))
    new_alone = trunk(images(1, seed=9))
    cache = OutputCache(trunk, max_bytes=2**20, name="trunk")
    cache.attach()
    trunk.computed = 0
    first = trunk(images(4))
    assert trunk.computed == 4 and (cache.hits, cache.misses) == (0, 4)
    for key in ("p1", "p2"):
        torch.testing.assert_close(first[key], batched[key])  # the batch's values, up to rounding
        assert torch.equal(first[key], torch.cat([a[key] for a in alone]))  # each alone: exact
    # two seen samples and a new one, in another order: only the new one is computed
    mixed = torch.cat([images(4)[[2, 0]], images(1, seed=9)])
    again = trunk(mixed)
    assert trunk.computed == 5 and (cache.hits, cache.misses) == (2, 5)
    assert torch.equal(again["p2"][:2], first["p2"][[2, 0]])
    assert torch.equal(again["p2"][2:], new_alone["p2"])
    # detached, the trunk computes everything again
    cache.detach()
    assert "forward" not in vars(trunk)
    trunk(images(4))
    assert trunk.computed == 9


@torch.no_grad()
def test_forward_hooks_still_see_a_served_output() -> None:
    trunk = Trunk().eval()
    seen = []
    trunk.register_forward_hook(lambda m, i, out: seen.append(out["p2"].clone()))
    cache = OutputCache(trunk, max_bytes=2**20)
    cache.attach()
    trunk(images(3))
    trunk(images(3))
    assert trunk.computed == 3 and len(seen) == 2 and torch.equal(seen[0], seen[1])


@torch.no_grad()
def test_the_cache_holds_at_most_max_bytes() -> None:
    trunk = Trunk().eval()
    per_sample = (4 * 8 * 8 + 6 * 4 * 4) * 4  # bytes of one sample's two float32 maps
    cache = OutputCache(trunk, max_bytes=2 * per_sample + 1)
    cache.attach()
    trunk(images(3))
    assert len(cache.store) == 2 and cache.bytes == 2 * per_sample
    trunk(images(3))  # the third sample was not kept: computed again
    assert trunk.computed == 4 and (cache.hits, cache.misses) == (2, 4)
    cache.clear()
    assert not cache.store and cache.bytes == 0


@torch.no_grad()
def test_a_cache_folder_is_shared_by_caches_of_the_same_weights_only(tmp_path) -> None:
    torch.manual_seed(0)
    trunk = Trunk().eval()
    first = OutputCache(trunk, max_bytes=2**20, name="backbone.body", directory=tmp_path)
    first.attach()
    want = trunk(images(3))
    first.detach()
    files = sorted(first.folder.glob("*.pt"))
    assert len(files) == 3 and first.folder.parent == tmp_path
    assert first.folder.name.startswith("backbone.body-")
    # another cache of the same weights (another run) reads them: nothing computed
    second = OutputCache(trunk, max_bytes=0, directory=tmp_path, name="backbone.body")
    second.attach()
    trunk.computed = 0
    got = trunk(images(3))
    assert trunk.computed == 0 and (second.hits, second.loaded, second.misses) == (3, 3, 0)
    assert all(torch.equal(got[k], want[k]) for k in want)
    second.detach()
    # a file cut short is computed again and rewritten
    files[0].write_bytes(files[0].read_bytes()[:10])
    third = OutputCache(trunk, max_bytes=0, directory=tmp_path, name="backbone.body")
    third.attach()
    got = trunk(images(3))
    assert (third.loaded, third.misses) == (2, 1) and all(
        torch.equal(got[k], want[k]) for k in want
    )
    third.detach()
    assert torch.load(files[0], weights_only=True).keys() == want.keys()
    # other weights: another folder, nothing read
    with torch.no_grad():
        trunk.a.weight.add_(1.0)
    other = OutputCache(trunk, max_bytes=0, directory=tmp_path, name="backbone.body")
    assert other.folder != first.folder and not list(other.folder.glob("*.pt"))


def test_keys_depend_on_values_dtype_and_shape_not_layout() -> None:
    x = torch.rand(4, 3, 5)
    assert sample_key(x) == sample_key(x.clone())
    assert sample_key(x) != sample_key(x.double())
    assert sample_key(x) != sample_key(x.reshape(3, 4, 5))
    y = x.clone()
    y[0, 0, 0] += 1e-6
    assert sample_key(x) != sample_key(y)
    z = torch.rand(2, 3, 4, 5)
    assert sample_key(z) == sample_key(z.to(memory_format=torch.channels_last))


@torch.no_grad()
def test_a_sample_under_autocast_is_another_entry(tmp_path) -> None:
    """The same sample run under bfloat16 autocast is computed and stored apart (its values
    differ); each precision is then served its own output, from memory and from the folder."""
    trunk = Trunk().eval()
    cache = OutputCache(trunk, max_bytes=2**20, directory=tmp_path, name="trunk")
    cache.attach()
    full = trunk(images(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = trunk(images(2))
    assert (cache.hits, cache.misses) == (0, 4)
    assert full["p2"].dtype == torch.float32 and half["p2"].dtype == torch.bfloat16
    assert len(list(cache.folder.glob("*.pt"))) == 4
    cache.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(trunk(images(2))["p2"], half["p2"])
    assert torch.equal(trunk(images(2))["p2"], full["p2"])
    assert (cache.hits, cache.loaded, cache.misses) == (4, 4, 4)
    # with autocast off the keys are those of a cache that never knew about precision
    assert sample_key(images(1)[0], "") == sample_key(images(1)[0])


def test_a_layer_that_cannot_be_cached_per_sample_is_named() -> None:
    class Pools(nn.Module):
        def forward(self, x):
            return x.mean(0)  # mixes the batch: no row per sample

    cache = OutputCache(Pools(), max_bytes=2**20, name="head.pool")
    cache.attach()
    with torch.no_grad(), pytest.raises(RuntimeError, match="'head.pool' returned a tensor"):
        cache.module(torch.rand(2, 3))
    with torch.no_grad(), pytest.raises(TypeError, match="batched tensor"):
        cache.module([torch.rand(3)])
    trunk = Trunk()
    OutputCache(trunk, max_bytes=2**20, name="trunk").attach()
    with pytest.raises(RuntimeError, match="needs gradients"):
        trunk(images(1).requires_grad_())


class Seg(nn.Module):
    """Conv segmenter (task-model contract) with a trunk ``body`` and a recorded ``neck``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width))
        self.neck = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Conv2d(width, 3, 1)

    def forward(self, images, targets=None):
        logits = self.head(torch.relu(self.neck(torch.relu(self.body(images)))))
        if self.training:
            return {"loss_ce": F.cross_entropy(logits, targets)}
        return logits


def distiller(cache: str | None) -> Distiller:
    torch.manual_seed(0)
    student, teacher = Seg(4), Seg(8)
    teacher.body[1].running_mean.uniform_()  # eval-mode statistics that are not the identity
    tokens = {"neck": [ReceptiveTokens(8, 3, weighted=True)]}
    term = {"kind": "maskd", "student": "neck", "teacher": "neck", "tokens": tokens, "weight": 1.0}
    example = torch.rand(2, 3, 8, 8)
    return Distiller(student, teacher, [term], example_input=example, teacher_cache=cache).train()


def test_a_cached_teacher_trunk_gives_the_uncached_losses_and_counts_its_hits() -> None:
    plain, cached = distiller(None), distiller("body")
    x, y = images(4), torch.randint(0, 3, (4, 8, 8))
    batches = [(x, y), (x[[3, 1, 0, 2]], y[[3, 1, 0, 2]]), (images(4, seed=5), y)]
    for step, (xb, yb) in enumerate(batches):
        want, got = plain(xb, yb), cached(xb, yb)
        assert "teacher_cache/hits" not in want
        assert float(got.pop("teacher_cache/hits")) == (1.0 if step == 1 else 0.0)
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
        total_loss(got).backward()  # the student's graph is intact behind served features
    assert cached.teacher_cache is not None and cached.teacher_cache.misses == 8


def test_teacher_cache_refuses_a_layer_holding_a_recorded_one_and_unknown_layers() -> None:
    with pytest.raises(ValueError, match="must name a layer inside the teacher"):
        distiller("")
    with pytest.raises(TypeError, match="teacher layer path"):
        distiller(3)  # type: ignore[arg-type]
    torch.manual_seed(0)
    student, teacher = Seg(4), Seg(8)
    term = {"kind": "fitnet", "student": "body.0", "teacher": "body.0"}
    with pytest.raises(ValueError, match=r"holds the teacher layers \['body.0'\]"):
        Distiller(student, teacher, [term], example_input=torch.rand(1, 3, 8, 8),
                  teacher_cache="body")  # fmt: skip
    with pytest.raises(ValueError, match="unknown layer 'bodyy'.*'body'"):
        distiller("bodyy")


def test_a_distillation_run_with_the_teacher_cache_resumes_exactly(tmp_path) -> None:
    """Six steps of 4 of 12 images (two epochs: the second served from the cache) straight,
    and stopped after four then resumed with an empty cache, end with the same weights."""
    from maskd.engine.trainer import build_trainer
    from test_channels_last import data, distill_module, spec

    def fit(out, steps: int, resume=None):
        module, student, _ = distill_module(teacher_cache="body.0")
        run = spec(False, checkpoint_every_n_steps=1)
        run.max_steps = steps
        build_trainer(run, tmp_path / out).fit(module, datamodule=data(), ckpt_path=resume)
        return module, student

    module, straight = fit("straight", 6)
    cache = module.net.teacher_cache
    assert cache.hits > 0 and cache.misses == 12  # every image once (no flips)
    fit("cut", 4)
    _, resumed = fit("cut", 6, resume=str(tmp_path / "cut" / "checkpoints" / "last.ckpt"))
    for (key, p), q in zip(straight.state_dict().items(), resumed.state_dict().values(),
                           strict=True):  # fmt: skip
        assert torch.equal(p, q), key
