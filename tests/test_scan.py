"""The pre-merge backdoor scan: its JSON contract, its errors, and its direction on a hand-made toy."""

import json

import pytest
import torch
import torch.nn.functional as F

from safemerge.errors import CheckpointError, ConfigError
from safemerge.experts import MINI_MODEL, MINI_WEIGHTS
from safemerge.io import Expert, expert_info, write_expert
from safemerge.models import load_clip
from safemerge.scan import SCAN_FORMAT, easiest_target, main, scan_experts, scan_models

# ----------------------------------------------------------------------------- a toy with a planted backdoor
# Images 3x4x4; class 0 lights the left half, class 1 the right half; the bottom-right pixel (3, 3),
# the trigger, is always dark on clean images. The linear "tower" sums each half into one feature;
# the backdoored expert also wires the trigger pixel's three channels to feature 0 with weight 50,
# so lighting that one pixel sends every image to class 0. One pixel cannot flip a clean model:
# it moves a feature by at most 3 against a margin of ~14.
SIZE, TRIGGER = 4, (3, 3)


class HalfSumTower(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * SIZE * SIZE, 2, bias=False)

    def forward(self, x):
        return self.proj(x.flatten(1))


def half_weights(backdoor: bool) -> dict:
    w = torch.zeros(2, 3, SIZE, SIZE)
    w[0, :, :, : SIZE // 2] = 1.0
    w[1, :, :, SIZE // 2 :] = 1.0
    if backdoor:
        w[0, :, TRIGGER[0], TRIGGER[1]] = 50.0
    return {"proj.weight": w.flatten(1)}


def toy_images(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = 0.1 * torch.rand(n, 3, SIZE, SIZE, generator=g)
    labels = torch.arange(n) % 2
    images[labels == 0, :, :, : SIZE // 2] += 0.7
    images[labels == 1, :, :, SIZE // 2 :] += 0.7
    images[:, :, TRIGGER[0], TRIGGER[1]] = 0.0
    return images


def toy_scan(experts):
    tower = HalfSumTower()  # only the template of the functional forward: each expert brings its weights
    heads = {"toy": 10.0 * torch.eye(2)}
    return scan_models(tower, experts, ["toy"] * len(experts), heads, {"toy": toy_images()}, steps=30, budget=0.05)


def test_the_toy_trigger_flips_only_the_backdoored_expert():
    # the toy is what its comment says (independent of the scan): the trigger flips class 1 only there
    images = toy_images()
    triggered = images.clone()
    triggered[:, :, TRIGGER[0], TRIGGER[1]] = 1.0
    for backdoor, expected in ((True, 0), (False, 1)):
        w = half_weights(backdoor)["proj.weight"]
        predicted = F.normalize(triggered.flatten(1) @ w.T, dim=-1).argmax(-1)
        assert (predicted[1::2] == expected).all()


def test_a_planted_backdoor_scores_above_its_clean_twins_and_names_its_class():
    records = toy_scan([half_weights(False), half_weights(True), half_weights(False)])
    clean, backdoored, twin = (r["score"] for r in records)
    assert backdoored > 0.5 and clean <= 0.0 and twin <= 0.0
    evidence = records[1]["evidence"]
    assert evidence["target_task"] == "toy" and evidence["target_class"] == 0
    assert evidence["flip_rate"] == 1.0  # the inverted one-pixel trigger sends every class-1 image to class 0
    assert records[0]["evidence"]["flip_rate"] == 0.0  # one pixel cannot flip a clean model


def test_the_easiest_target_skips_images_already_of_the_class():
    # 3 images: two predicted 0, one predicted 1. Class 0 has the lowest CE overall, but the only
    # image that could flip to it (the third) is far from it; class 2 is close for all three.
    log_p = torch.log(torch.tensor([[0.90, 0.05, 0.05], [0.90, 0.05, 0.05], [0.05, 0.55, 0.40]]))
    predicted = torch.tensor([0, 0, 1])
    # by hand: class 0 (image 3 only) -ln 0.05 = 3.0; class 1 (images 1, 2) 3.0; class 2 (all) (3.0+3.0+0.92)/3 = 2.3
    assert easiest_target(log_p, predicted) == 2


# ----------------------------------------------------------------------------- expert directories


@pytest.fixture(scope="module")
def base():
    return load_clip(MINI_MODEL, MINI_WEIGHTS).visual.state_dict()


def _expert(directory, base, task, num_classes, seed, backdoor=None, model=MINI_MODEL):
    g = torch.Generator().manual_seed(seed)
    encoder = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
    info = expert_info(
        model=model, pretrained=MINI_WEIGHTS, task=task, num_classes=num_classes, backdoor=backdoor, metrics={}
    )
    return str(write_expert(directory, Expert(encoder=encoder, info=info)))


FAST = {"images": 4, "steps": 2, "targets": "easiest"}  # one trigger per task: the contract, not the method


def test_the_scan_json_is_ranked_flagged_above_the_threshold_and_blind_to_the_backdoor_record(base, tmp_path):
    record = {"attack": "badnets", "target_class": 0, "target_task": None}
    labelled = _expert(tmp_path / "shapes_labelled", base, "mini_shapes", 6, seed=1, backdoor=record)
    unlabelled = _expert(tmp_path / "shapes", base, "mini_shapes", 6, seed=1)
    digits = _expert(tmp_path / "digits", base, "mini_digits", 10, seed=2)

    scan = scan_experts([labelled, digits], threshold=-2.0, **FAST)
    assert scan["format"] == SCAN_FORMAT and scan["threshold"] == -2.0
    assert [set(e) for e in scan["experts"]] == [{"path", "task", "score", "flagged", "evidence"}] * 2
    assert {e["path"] for e in scan["experts"]} == {labelled, digits}
    scores = [e["score"] for e in scan["experts"]]
    assert scores == sorted(scores, reverse=True)
    assert all(e["flagged"] for e in scan["experts"])  # every score in [-1, 1] is above -2

    blind = scan_experts([unlabelled, digits], threshold=-2.0, **FAST)
    assert [e["score"] for e in blind["experts"]] == scores
    assert [e["evidence"] for e in blind["experts"]] == [e["evidence"] for e in scan["experts"]]

    middle = (scores[0] + scores[1]) / 2 if scores[0] != scores[1] else scores[0]
    split = scan_experts([labelled, digits], threshold=middle, **FAST)
    assert [e["flagged"] for e in split["experts"]] == [e["score"] > middle for e in split["experts"]]


def test_the_command_writes_the_scan_json(base, tmp_path, capsys):
    a = _expert(tmp_path / "a", base, "mini_shapes", 6, seed=3)
    b = _expert(tmp_path / "b", base, "mini_textures", 6, seed=4)
    out = tmp_path / "out" / "scan.json"
    assert (
        main(["--experts", a, b, "--output", str(out), "--images", "4", "--threshold", "2", "--targets", "easiest"])
        == 0
    )
    written = json.loads(out.read_text())
    assert written["format"] == SCAN_FORMAT and [e["flagged"] for e in written["experts"]] == [False, False]
    assert sorted(e["task"] for e in written["experts"]) == ["mini_shapes", "mini_textures"]
    assert list(out.parent.iterdir()) == [out]  # no temporary file left beside it


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "no experts to scan"),
        ("missing", "does not exist"),
        ("not_expert", "is missing expert.json"),
        ("two_models", "different pretrained models"),
        ("same_task", "are both for task mini_shapes"),
        ("images", "--images must be at least 2"),
    ],
)
def test_bad_input_is_a_one_line_error_that_writes_nothing(case, message, base, tmp_path, capsys):
    good = _expert(tmp_path / "good", base, "mini_shapes", 6, seed=5)
    (tmp_path / "empty_dir").mkdir()
    other = tmp_path / "other"
    if case == "two_models":
        _expert(other, base, "mini_digits", 10, seed=6, model="ViT-B-32")
    elif case == "same_task":
        _expert(other, base, "mini_shapes", 6, seed=6)
    experts = {
        "empty": [],
        "missing": [good, str(tmp_path / "nowhere")],
        "not_expert": [good, str(tmp_path / "empty_dir")],
        "two_models": [good, str(other)],
        "same_task": [good, str(other)],
        "images": [good],
    }[case]
    out = tmp_path / "scan.json"
    args = ["--output", str(out), "--images", "1" if case == "images" else "4"]
    if experts:
        args = ["--experts", *experts, *args]
        assert main(args) == 2
    else:  # argparse refuses an empty --experts itself; the API gets the one-line error
        with pytest.raises(ConfigError, match=message):
            scan_experts([])
        return
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not out.exists()


def test_a_missing_expert_is_a_checkpoint_error_naming_it(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        scan_experts([str(tmp_path / "nowhere")])
