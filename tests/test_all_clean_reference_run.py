"""scripts/all_clean_reference.py's measurement (``reference_for``) run on quick mini experts
and checked against an independent computation: the clean twins merged by hand
(θ_0 + λ Σ (θ_i − θ_0)), every test image classified by a plain loop, the backdoored expert's
trigger stamped by hand on its target task's images (target-class images left out)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from safemerge.data import get_task
from safemerge.errors import ConfigError
from safemerge.experts import MINI_MODEL, MINI_WEIGHTS, ExpertSpec, ensure_expert
from safemerge.io import read_expert
from safemerge.models import cached_task_heads, load_clip
from safemerge.protocol import reference as all_clean_reference

QUICK = {"lr": 1e-4, "max_steps": 10, "warmup_steps": 2, "batch_size": 32}
BADNETS = {
    "class_path": "safemerge.attacks.BadNets",  # the letters expert of tests/test_merge.py's pool
    "init_args": {"target_class": 1, "target_task": "mini_shapes", "poison_rate": 0.2, "size": 0.125},
}
REFERENCES = ["mini:mini_shapes", "mini:mini_letters:backdoored"]
LAMBDAS = [0.3, 1.0]


@pytest.fixture(scope="module")
def experts() -> dict[str, Path]:
    """Quick experts standing in for the mini pool's: a reference -> its directory."""
    specs = {
        "mini:mini_shapes": ExpertSpec("mini_shapes", MINI_MODEL, MINI_WEIGHTS, **QUICK),
        "mini:mini_letters": ExpertSpec("mini_letters", MINI_MODEL, MINI_WEIGHTS, **QUICK),
        "mini:mini_letters:backdoored": ExpertSpec("mini_letters", MINI_MODEL, MINI_WEIGHTS, attack=BADNETS, **QUICK),
    }
    return {reference: ensure_expert(spec, accelerator="cpu") for reference, spec in specs.items()}


@torch.no_grad()
def _predict(clip, state, heads, task, trigger=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and labels of ``task``'s test split under ``state`` (``trigger`` stamped)."""
    clip.visual.load_state_dict(state)
    dataset = get_task(task).build("test", root=None, image_size=clip.image_size, download=False, seed=0)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    if trigger is not None:
        images = (images * (1 - trigger["mask"]) + trigger["pattern"] * trigger["mask"]).clamp(0, 1)
    mean, std = torch.tensor(clip.mean).view(1, 3, 1, 1), torch.tensor(clip.std).view(1, 3, 1, 1)
    predictions = torch.cat(
        [(F.normalize(clip.visual((x - mean) / std), dim=-1) @ heads[task].T).argmax(-1) for x in images.split(500)]
    )
    return predictions, labels


def _accuracy(predictions, labels) -> float:
    return float((predictions == labels).float().mean())


def _target_share(predictions, labels, target) -> float:
    """The share of non-target images classified as ``target`` (ASR on triggered images)."""
    kept = labels != target
    return float((predictions[kept] == target).float().mean())


def _tiny_pool(experts, tmp_path, monkeypatch):
    """A pools folder with the pool ``tiny`` (REFERENCES, resolved to the quick experts), the
    mini CLIP and its base tower."""
    pools = tmp_path / "pools"
    pools.mkdir()
    (pools / "tiny.yaml").write_text(yaml.safe_dump({"model": {"init_args": {"experts": REFERENCES}}}))
    monkeypatch.setattr(all_clean_reference, "resolve_expert", lambda reference, *a, **k: experts[reference])
    clip = load_clip(MINI_MODEL, MINI_WEIGHTS)
    return pools, clip, {k: v.clone() for k, v in clip.visual.state_dict().items()}


def test_reference_for_measures_the_pools_triggers_on_the_merge_of_its_clean_twins(experts, tmp_path, monkeypatch):
    pools, clip, base = _tiny_pool(experts, tmp_path, monkeypatch)
    result = all_clean_reference.reference_for("tiny", LAMBDAS, clip, base, pools=pools)

    assert result["clean_experts"] == ["mini:mini_shapes", "mini:mini_letters"]
    assert result["backdoors"] == [
        {"expert": "mini:mini_letters:backdoored", "target_task": "mini_shapes", "target_class": 1}
    ]
    clean = [read_expert(experts[r]).encoder for r in result["clean_experts"]]
    pool = [read_expert(experts[r]).encoder for r in REFERENCES]
    trigger = read_expert(experts["mini:mini_letters:backdoored"]).trigger
    tasks = ["mini_shapes", "mini_letters"]
    heads = cached_task_heads(clip, [get_task(t) for t in tasks])
    for lam in LAMBDAS:
        merged = {k: base[k] + lam * sum(e[k] - base[k] for e in clean) for k in base}
        accuracy = {t: _accuracy(*_predict(clip, merged, heads, t)) for t in tasks}
        asr = _target_share(*_predict(clip, merged, heads, "mini_shapes", trigger), target=1)
        target_rate = _target_share(*_predict(clip, merged, heads, "mini_shapes"), target=1)
        reported = result["task_arithmetic"][str(lam)]
        for task in tasks:
            assert reported["tasks"][task]["accuracy"] == pytest.approx(accuracy[task], abs=1e-6), (lam, task)
        assert reported["backdoors"][0]["asr"] == pytest.approx(asr, abs=1e-6), lam
        assert reported["backdoors"][0]["target_rate"] == pytest.approx(target_rate, abs=1e-6), lam
        assert reported["tasks"]["mini_shapes"]["asr"] == pytest.approx(asr, abs=1e-6)
        assert reported["tasks"]["mini_letters"]["asr"] is None  # no backdoor targets letters
        assert reported["average"]["accuracy"] == pytest.approx(sum(accuracy.values()) / 2, abs=1e-6)
        assert reported["average"]["asr"] == pytest.approx(asr, abs=1e-6)
        if lam == 1.0:  # the clean twins, not the pool: merging the pool gives other numbers
            with_pool = {k: base[k] + lam * sum(e[k] - base[k] for e in pool) for k in base}
            pooled = _accuracy(*_predict(clip, with_pool, heads, "mini_letters"))
            assert pooled != pytest.approx(accuracy["mini_letters"], abs=1e-6)


def _merged_directory(path, tower, tasks):
    from safemerge.io import Expert, expert_info, write_expert

    info = expert_info(
        model=MINI_MODEL, pretrained=MINI_WEIGHTS, task="+".join(tasks), num_classes=1, backdoor=None, metrics={}
    )
    return write_expert(path, Expert(encoder=tower, info={**info, "tasks": tasks}))


def test_a_merge_of_the_clean_pool_by_another_method_is_measured_with_the_pools_triggers(
    experts, tmp_path, monkeypatch
):
    """``--merged``: a tower merged elsewhere (here λ 0.6 by hand, standing in for a learned
    method's merged/ directory) is evaluated on the pool's triggers exactly as the TA merges are."""
    pools, clip, base = _tiny_pool(experts, tmp_path, monkeypatch)
    clean = [read_expert(experts[r]).encoder for r in ("mini:mini_shapes", "mini:mini_letters")]
    tower = {k: base[k] + 0.6 * sum(e[k] - base[k] for e in clean) for k in base}
    tasks = ["mini_shapes", "mini_letters"]
    directory = _merged_directory(tmp_path / "merged", tower, tasks)
    result = all_clean_reference.reference_for("tiny", [0.3], clip, base, pools=pools, merged={"hand": directory})

    trigger = read_expert(experts["mini:mini_letters:backdoored"]).trigger
    heads = cached_task_heads(clip, [get_task(t) for t in tasks])
    reported = result["merged"]["hand"]
    assert reported["backdoors"][0]["asr"] == pytest.approx(
        _target_share(*_predict(clip, tower, heads, "mini_shapes", trigger), target=1), abs=1e-6
    )
    assert reported["backdoors"][0]["target_rate"] == pytest.approx(
        _target_share(*_predict(clip, tower, heads, "mini_shapes"), target=1), abs=1e-6
    )
    for task in tasks:
        assert reported["tasks"][task]["accuracy"] == pytest.approx(
            _accuracy(*_predict(clip, tower, heads, task)), abs=1e-6
        )
    assert reported != result["task_arithmetic"]["0.3"]  # its own tower, not the λ 0.3 merge

    other = _merged_directory(tmp_path / "other", tower, ["mini_letters", "mini_shapes"])
    with pytest.raises(ConfigError, match="merged the tasks mini_letters, mini_shapes, not the pool's"):
        all_clean_reference.reference_for("tiny", [0.3], clip, base, pools=pools, merged={"other": other})


@pytest.mark.parametrize("value", ["noequals", "=dir", "label="])
def test_merged_arguments_must_be_label_equals_directory(value):
    with pytest.raises(ConfigError, match="--merged takes LABEL=DIR"):
        all_clean_reference.merged_directories([value])
