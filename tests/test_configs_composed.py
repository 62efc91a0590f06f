"""The default pool is defined once (configs/pools/mini_default.yaml); configs/merge/base.yaml and
configs/merge.yaml carry generated copies, and configs/merge.yaml is the composition of its parts."""

import shutil
from pathlib import Path

import pytest
import yaml

from safemerge.protocol import configs
from safemerge.protocol.configs import composed, generated, main_job

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _experts(path: Path) -> list[str]:
    return yaml.safe_load(path.read_text())["model"]["init_args"]["experts"]


def test_the_generated_configs_are_current():
    for path, text in generated().items():
        assert path.read_text() == text, f"{path} is stale: run python -m safemerge.protocol.configs"


def test_the_main_job_is_the_restricted_tsv_expert_label_merge_then_sau_with_alternating_examples_and_base_outputs():
    job = yaml.safe_load((CONFIGS / "merge.yaml").read_text())
    parts = composed(
        [
            CONFIGS / p
            for p in (
                "merge/base.yaml",
                "merge/expert_label_merging.yaml",
                "merge_options/orthogonal_task_vectors.yaml",
                "merge_options/clean_subspace.yaml",
                "defense/sau.yaml",
                "defense/expert_labels.yaml",
                "defense/one_attack_step.yaml",
                "defense/l2_examples.yaml",
                "defense/alternate_examples.yaml",
                "defense/steps_200.yaml",
            )
        ]
    )
    init = job["model"]["init_args"]
    assert init["method"] == {
        "class_path": "safemerge.merging.ExpertLabelMerging",
        "init_args": {
            "granularity": "layer",
            "scaling_factor": 0.3,
            "steps": 200,
            "lr": 0.03,
            "task_vectors": "orthogonal",
        },
    }
    assert init["defense"]["class_path"] == "safemerge.defenses.SAU"
    assert (
        init["defense"]["init_args"]["attack_steps"] == 1 and init["defense"]["init_args"]["pseudo_labels"] == "experts"
    )
    assert {k: init["defense"]["init_args"][k] for k in ("steps", "adv_weight", "l2_weight", "l2_eps")} == {
        "steps": 200,
        "adv_weight": 1.0,
        "l2_weight": 1.0,
        "l2_eps": 6.0,
    }
    assert init["defense"]["init_args"]["alternate"] is True
    assert init["clean_subspace"] == 0.8 and init["clean_subspace_images"] == 500
    # everything but the output places is the composition; those stay base's
    assert (
        init["output_dir"]
        == job["trainer"]["default_root_dir"]
        == "outputs/merge"
        != parts["model"]["init_args"]["output_dir"]
    )
    assert "name" not in job["trainer"]["logger"]["init_args"]
    for section in ("model", "trainer"):
        parts[section].pop("default_root_dir", None), parts[section].pop("logger", None)
        job[section].pop("default_root_dir", None), job[section].pop("logger", None)
    parts["model"]["init_args"].pop("output_dir"), job["model"]["init_args"].pop("output_dir")
    assert job == parts


def test_a_change_to_the_pool_file_reaches_both_generated_configs(tmp_path):
    copy = tmp_path / "configs"
    shutil.copytree(CONFIGS, copy)
    pool = copy / "pools" / "mini_default.yaml"
    changed = ["mini:mini_shapes:blended", "mini:mini_digits"]
    pool.write_text(yaml.safe_dump({"model": {"init_args": {"experts": changed}}}))
    texts = generated(copy)
    assert texts[copy / "merge" / "base.yaml"] != (CONFIGS / "merge" / "base.yaml").read_text()
    for path, text in texts.items():
        path.write_text(text)
        assert _experts(path) == changed
    assert main_job(copy)["model"]["init_args"]["experts"] == changed
    # base.yaml keeps its hand-written parts: only the list changed
    before, after = (yaml.safe_load((c / "merge" / "base.yaml").read_text()) for c in (CONFIGS, copy))
    before["model"]["init_args"].pop("experts"), after["model"]["init_args"].pop("experts")
    assert before == after


def test_no_other_config_writes_the_default_pool_out():
    default = _experts(CONFIGS / "pools" / "mini_default.yaml")
    copies = {CONFIGS / "merge.yaml", CONFIGS / "merge" / "base.yaml", CONFIGS / "pools" / "mini_default.yaml"}
    for path in CONFIGS.rglob("*.yaml"):
        if path not in copies:
            init = (yaml.safe_load(path.read_text()) or {}).get("model", {}).get("init_args", {}) or {}
            assert init.get("experts") != default, (
                f"{path} writes the default pool out; compose configs/pools/mini_default.yaml"
            )


def test_check_mode_names_a_stale_config(tmp_path, monkeypatch):
    copy = tmp_path / "configs"
    shutil.copytree(CONFIGS, copy)
    (copy / "defense" / "one_attack_step.yaml").write_text(
        "model:\n  init_args:\n    defense:\n      init_args:\n        attack_steps: 3\n"
    )
    monkeypatch.setattr(configs, "generated", lambda: generated(copy))
    with pytest.raises(SystemExit, match=r"error: stale: .*merge\.yaml; run python -m safemerge.protocol.configs"):
        configs.main(["--check"])
