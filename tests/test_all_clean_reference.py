"""scripts/all_clean_reference.py (safemerge.protocol.reference): a pool's triggers measured on
the merge of its clean twins."""

from pathlib import Path

import pytest
import yaml

from safemerge.protocol import reference
from safemerge.protocol.pools import backdoored_mini_pool, clean_twin

POOLS = Path(__file__).resolve().parents[1] / "configs" / "pools"


def _experts(pool):
    return yaml.safe_load((POOLS / f"{pool}.yaml").read_text())["model"]["init_args"]["experts"]


@pytest.mark.parametrize(
    "pool",
    [
        "mini_default",
        "mini_heldout_blended",
        "mini_heldout_offtask",
        "mini_heldout_two",
        "mini_heldout_wanet",
        "mini_heldout_sig",
        "mini_heldout_same_task",
        "mini_heldout_low_poison",
        "mini_dev_threats",
    ],
)
def test_the_clean_twins_of_every_backdoored_pool_are_the_all_clean_pool(pool):
    references = backdoored_mini_pool(pool)
    assert references != _experts("mini_clean")  # it has backdoored experts ...
    assert [clean_twin(r) for r in references] == _experts("mini_clean")  # ... and these twins


@pytest.mark.parametrize(
    "pool, message",
    [
        ("nope", r"unknown pool 'nope'; pools \(.*\): .*mini_clean, mini_default"),
        ("mini_clean", "pool 'mini_clean' has no backdoored expert"),
        ("foreign", "pool 'foreign' has experts outside the mini pool"),
    ],
)
def test_bad_pools_are_refused_before_anything_is_fine_tuned(pool, message, tmp_path, monkeypatch, capsys):
    for path in POOLS.glob("*.yaml"):
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "foreign.yaml").write_text(
        yaml.safe_dump({"model": {"init_args": {"experts": ["/experts/gtsrb", "mini:mini_digits:patch"]}}})
    )
    monkeypatch.setattr(reference, "reference_for", lambda *a: pytest.fail("a merge ran"))
    monkeypatch.setattr(reference, "load_clip", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match="error: " + message):
        reference.main(["--pools", "mini_default", pool, "--output", str(tmp_path / "out.json")], pools=tmp_path)
    assert not (tmp_path / "out.json").exists()
