"""Config files with ``base:``: merge rules, relative paths, errors, and the CLI path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from maskd.cli import main
from maskd.config_files import load_config, merge_configs
from maskd.errors import UserValueError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
OVERLAYS = ("cwd", "fgd", "fitnet", "logits_kd")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def print_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exc:
        main([*args, "--print_config"])
    assert exc.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_merge_dicts_recursively_and_replace_everything_else() -> None:
    below = {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "l": [1, 2, 3], "s": 1, "d": {"k": 1}}
    above = {"a": {"y": {"q": 20, "r": 30}}, "l": [9], "s": None, "d": 5, "new": {"z": 0}}
    merged = merge_configs(below, above)
    assert merged == {
        "a": {"x": 1, "y": {"p": 1, "q": 20, "r": 30}},
        "l": [9],
        "s": None,
        "d": 5,
        "new": {"z": 0},
    }
    # a scalar under a mapping is replaced by a mapping too
    assert merge_configs({"d": 5}, {"d": {"k": 1}}) == {"d": {"k": 1}}
    # the inputs are untouched and share nothing with the result
    assert below["a"]["y"] == {"p": 1, "q": 2} and above["a"]["y"] == {"q": 20, "r": 30}
    merged["new"]["z"] = 1
    merged["a"]["x"] = 7
    assert above["new"] == {"z": 0} and below["a"]["x"] == 1


def test_bases_are_relative_to_the_file_naming_them_and_merged_in_order(tmp_path) -> None:
    # top.yaml -> [shared/one.yaml, shared/two.yaml]; one.yaml -> deeper/root.yaml
    write(tmp_path / "shared/deeper/root.yaml", "optim: {lr: 1.0, momentum: 0.5}\nrun: {seed: 1}\n")
    write(tmp_path / "shared/one.yaml", "base: deeper/root.yaml\noptim: {lr: 2.0}\nl: [1]\n")
    write(tmp_path / "shared/two.yaml", "optim: {name: adam}\nl: [2, 3]\nrun: {seed: 2}\n")
    top = write(
        tmp_path / "top.yaml",
        "base: [shared/one.yaml, shared/two.yaml]\nrun: {out: x}\n",
    )
    assert load_config(top) == {
        "optim": {"lr": 2.0, "momentum": 0.5, "name": "adam"},
        "run": {"seed": 2, "out": "x"},  # two.yaml over one.yaml, the file over both
        "l": [2, 3],
    }
    # the file's own keys win over every base; an empty file adds nothing
    write(tmp_path / "empty.yaml", "")
    child = write(tmp_path / "sub/child.yaml", "base: [../top.yaml, ../empty.yaml]\nl: []\n")
    assert load_config(child)["l"] == [] and "base" not in load_config(child)


def test_a_base_chain_that_loops_is_one_line_naming_the_files(tmp_path) -> None:
    write(tmp_path / "a.yaml", "base: b/b.yaml\n")
    write(tmp_path / "b/b.yaml", "base: ../a.yaml\n")
    with pytest.raises(UserValueError, match="config base cycle: ") as err:
        load_config(tmp_path / "a.yaml")
    msg = str(err.value)
    assert msg.endswith(
        f"{tmp_path / 'a.yaml'} -> {tmp_path / 'b/b.yaml'} -> {tmp_path / 'a.yaml'}"
    )
    self_loop = write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(UserValueError, match="cycle"):
        load_config(self_loop)


def test_the_same_base_twice_without_a_loop_is_fine(tmp_path) -> None:
    write(tmp_path / "common.yaml", "x: 1\n")
    write(tmp_path / "left.yaml", "base: common.yaml\ny: 1\n")
    write(tmp_path / "right.yaml", "base: common.yaml\nz: 1\n")
    top = write(tmp_path / "top.yaml", "base: [left.yaml, right.yaml]\n")
    assert load_config(top) == {"x": 1, "y": 1, "z": 1}


@pytest.mark.parametrize(
    ("files", "needle"),
    [
        (
            {"top.yaml": "base: mid.yaml\n", "mid.yaml": "base: gone.yaml\n"},
            "base {gone!r} not found",
        ),
        ({"top.yaml": "base: [3]\n"}, "'base' must be a file path or a list of paths, got [3]"),
        ({"top.yaml": "base: mid.yaml\n", "mid.yaml": "- 1\n"}, "expected a mapping of options"),
        ({"top.yaml": "base: mid.yaml\n", "mid.yaml": "a: [1\n"}, "not valid YAML"),
        ({"top.yaml": "base: folder\n", "folder/x.yaml": "a: 1\n"}, "is not a file"),
    ],
)
def test_bad_base_files_are_one_line_naming_the_chain(tmp_path, files, needle, capsys) -> None:
    for name, text in files.items():
        write(tmp_path / name, text)
    needle = needle.format(gone=str(tmp_path / "gone.yaml"))
    top = tmp_path / "top.yaml"
    with pytest.raises(UserValueError) as err:
        load_config(top)
    assert needle in str(err.value) and str(top) in str(err.value)
    # the same through the command line: one line, exit status 2, no traceback
    assert main(["train", "--config", str(top)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maskd: error: config ") and needle in lines[0]


def test_print_config_shows_the_merged_options_and_later_options_win(tmp_path, capsys) -> None:
    write(
        tmp_path / "_base/common.yaml",
        "optim: {name: adam, lr: 0.1, weight_decay: 0.5}\nrun: {seed: 7, out: base}\n",
    )
    cfg = write(tmp_path / "exp/train.yaml", "base: ../_base/common.yaml\noptim: {lr: 0.2}\n")
    out = print_config(["train", "--config", str(cfg)], capsys)
    assert "base" not in out and "config" not in out
    assert out["optim"]["name"] == "adam" and out["optim"]["lr"] == 0.2
    assert out["optim"]["weight_decay"] == 0.5 and out["run"]["seed"] == 7
    assert out["optim"]["momentum"] == 0.9  # the parser's default where no file sets it
    # options after the file win over file and base alike; a second --config over the first
    over = write(tmp_path / "over.yaml", "run: {out: over}\n")
    out = print_config(
        ["train", "--config", str(cfg), "--config", str(over), "--optim.weight_decay=0.25"], capsys
    )
    assert out["run"]["seed"] == 7 and out["run"]["out"] == "over"
    assert out["optim"]["weight_decay"] == 0.25 and out["optim"]["lr"] == 0.2


def test_inline_config_text_takes_bases_relative_to_the_working_directory(
    tmp_path, monkeypatch, capsys
) -> None:
    write(tmp_path / "b.yaml", "optim: {lr: 0.3}\nrun: {seed: 5}\n")
    monkeypatch.chdir(tmp_path)
    out = print_config(["train", "--config", "{base: b.yaml, run: {seed: 9}}"], capsys)
    assert out["optim"]["lr"] == 0.3 and out["run"]["seed"] == 9


def test_values_read_as_jsonargparse_reads_a_config_file(tmp_path, capsys) -> None:
    """Exponents without a dot are floats, a date stays text: as without a ``base``."""
    text = "optim: {lr: 1e-3, min_lr: 2.5E-6}\nrun: {out: 2024-01-31}\n"
    plain = print_config(["train", "--config", str(write(tmp_path / "plain.yaml", text))], capsys)
    write(tmp_path / "b.yaml", text)
    child = write(tmp_path / "child.yaml", "base: b.yaml\n")
    assert load_config(child) == {
        "optim": {"lr": 1e-3, "min_lr": 2.5e-6},
        "run": {"out": "2024-01-31"},
    }
    assert print_config(["train", "--config", str(child)], capsys) == plain


SHIPPED = sorted(
    p
    for folder in ("coco", "cityscapes")
    for p in (CONFIGS / folder).glob("*/*.yaml")
    if p.parent.name != "_base"
)
COMMAND = {"teacher": "train", "learn_masks": "learn-masks", "distill": "distill"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_configs_reach_the_cli_as_load_config_reads_them(path, capsys) -> None:
    """Every key a shipped config sets (after its bases) is what the command line resolves."""
    command = "distill" if path.stem in OVERLAYS else COMMAND[path.stem]
    printed = print_config([command, "--config", str(path)], capsys)
    merged = load_config(path)

    def check(want: dict, got: dict, where: str) -> None:
        for key, value in want.items():
            if isinstance(value, dict) and isinstance(got.get(key), dict) and key != "options":
                check(value, got[key], f"{where}{key}.")
            else:
                assert got.get(key) == value, f"{where}{key}"

    check(merged, printed, "")


@pytest.mark.parametrize(
    "overlay",
    [p for p in SHIPPED if p.stem in OVERLAYS],
    ids=lambda p: p.parent.name + "/" + p.stem,
)
def test_peer_configs_are_their_distill_config_plus_the_term(overlay, capsys) -> None:
    alone = print_config(["distill", "--config", str(overlay)], capsys)
    stacked = print_config(
        ["distill", "--config", str(overlay.parent / "distill.yaml"), "--config", str(overlay)],
        capsys,
    )
    assert alone == stacked  # the old two-file form still works
    distill = load_config(overlay.parent / "distill.yaml")
    assert alone["run"]["out"] == str(Path(distill["run"]["out"]).parent / overlay.stem)
    assert alone["distill"]["tokens"] is None
    assert [t["kind"] for t in alone["distill"]["terms"]] == [overlay.stem]
    plain = print_config(["distill", "--config", str(overlay.parent / "distill.yaml")], capsys)
    for group in ("student", "teacher", "optim", "data", "trainer"):
        assert alone[group] == plain[group], group
