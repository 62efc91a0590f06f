"""Reports: the contract's fields, and comparisons across runs (mean ± std per method)."""

import json

import pytest

from safemerge.report import (
    build_report,
    comparison_table,
    main,
    pools_table,
    read_report,
    summarize,
    summarize_pools,
    write_report,
)


def _report(method, shape_acc, shape_asr, color_acc, runtime=1.0, target_rate=None):
    return build_report(
        method,
        {
            "shape": {"accuracy": shape_acc, "asr": shape_asr, "target_rate": target_rate, "expert_accuracy": 0.8},
            "color": {"accuracy": color_acc, "asr": None, "expert_accuracy": None},
        },
        config={"seed": 0},
        runtime_s=runtime,
    )


def test_report_fields_follow_the_contract():
    report = _report("ties", 0.4, 0.25, 0.6)
    assert report["format"] == "safemerge-report/1" and report["method"] == "ties"
    assert report["tasks"]["shape"] == {
        "accuracy": 0.4,
        "asr": 0.25,
        "target_rate": None,
        "expert_accuracy": 0.8,
        "normalized_accuracy": 0.5,
    }
    assert report["tasks"]["color"]["normalized_accuracy"] is None
    assert report["average"] == {"accuracy": 0.5, "asr": 0.25, "target_rate": None, "normalized_accuracy": 0.5}


def test_runs_of_one_method_are_summarised_as_mean_and_sample_std(tmp_path, capsys):
    runs = [_report("dam", 0.4, 0.1, 0.6), _report("dam", 0.6, 0.3, 0.6), _report("ta", 0.5, 0.5, 0.5)]
    summary = summarize(runs)
    assert list(summary) == ["dam", "ta"] and summary["dam"]["runs"] == 2
    mean, std = summary["dam"]["tasks"]["shape"]["accuracy"]
    assert mean == pytest.approx(0.5) and std == pytest.approx(0.1414213, rel=1e-5)  # stdev of 0.4, 0.6
    assert summary["dam"]["average"]["asr"] == pytest.approx((0.2, 0.1414213), rel=1e-5)
    table = comparison_table(summary)
    assert "| dam | 2 | 50.0 ± 14.1 | 60.0 ± 0.0 | 20.0 ± 14.1 |" in table
    assert "| ta | 1 | 50.0 | 50.0 | 50.0 |" in table

    paths = []
    for i, run in enumerate(runs):
        write_report(tmp_path / f"run{i}", run)
        paths.append(str(tmp_path / f"run{i}" / "report.json"))
    assert read_report(tmp_path / "run0") == json.loads((tmp_path / "run0" / "report.json").read_text())
    plot = tmp_path / "plot.png"
    assert main([*paths, "--plot", str(plot)]) == 0
    assert "| dam | 2 |" in capsys.readouterr().out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_file_that_is_not_a_report_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "x.json").write_text('{"format": "other"}')
    assert main([str(tmp_path / "x.json")]) == 2
    assert "is not a safemerge report" in capsys.readouterr().err


def test_labels_tell_a_method_from_the_same_method_with_a_defence():
    runs = [_report("ta", 0.5, 0.4, 0.5), _report("ta", 0.4, 0.1, 0.4), _report("ta", 0.4, 0.2, 0.4)]
    summary = summarize(runs, labels=["ta", "ta+sau", "ta+sau"])
    assert list(summary) == ["ta", "ta+sau"] and summary["ta+sau"]["runs"] == 2
    assert summary["ta+sau"]["average"]["asr"][0] == pytest.approx(0.15)


def test_the_mean_over_pools_is_taken_per_seed_and_a_static_method_reuses_its_one_run():
    # pool A: the learned method's two seeds; pool B: likewise; the static method ran once per pool
    a = {
        "learned": {0: _report("l", 0.2, 0.1, 0.4), 1: _report("l", 0.4, 0.3, 0.4)},
        "static": {0: _report("s", 0.5, 0.5, 0.5)},
    }
    b = {
        "learned": {0: _report("l", 0.6, 0.5, 0.6, target_rate=0.2), 1: _report("l", 0.6, 0.1, 0.6, target_rate=0.1)},
        "static": {0: _report("s", 0.1, 0.3, 0.1)},
    }
    summary = summarize_pools({"A": a, "B": b})
    learned = summary["learned"]
    # averages (accuracy over shape and color): A seed0 0.3, seed1 0.4; B seed0 0.6, seed1 0.6
    assert learned["pools"]["A"]["accuracy"] == pytest.approx((0.35, 0.0707107), rel=1e-5)
    # mean over pools per seed: seed0 (0.3 + 0.6) / 2 = 0.45, seed1 (0.4 + 0.6) / 2 = 0.5
    assert learned["average"]["accuracy"] == pytest.approx((0.475, 0.0353553), rel=1e-5)
    # ASR (shape only): seed0 (0.1 + 0.5) / 2 = 0.3, seed1 (0.3 + 0.1) / 2 = 0.2
    assert learned["average"]["asr"] == pytest.approx((0.25, 0.0707107), rel=1e-5)
    assert summary["static"]["runs"] == 1 and summary["static"]["average"]["asr"] == (pytest.approx(0.4), 0.0)
    table = pools_table(summary, ["A", "B"])
    # the untriggered target rate: known on pool B only (0.2, 0.1), so its mean is B's
    assert (
        "| learned | 2 | 35.0 ± 7.1 / 20.0 ± 14.1 (—) | 60.0 ± 0.0 / 30.0 ± 28.3 (15.0) | 47.5 ± 3.5 | 25.0 ± 7.1 | 15.0 ± 7.1 |"
        in table
    )
    assert "| static | 1 | 50.0 / 50.0 (—) | 10.0 / 30.0 (—) | 30.0 | 40.0 | — |" in table


def test_a_method_missing_on_a_pool_has_no_mean_over_pools():
    summary = summarize_pools({"A": {"ta": {0: _report("ta", 0.5, 0.5, 0.5)}}, "B": {}})
    assert summary["ta"]["average"]["accuracy"] == (None, None)
    assert "| ta | 1 | 50.0 / 50.0 (—) | — | — | — | — | — |" in pools_table(summary, ["A", "B"])


def test_report_md_is_titled_by_method_and_defence_and_names_backdoors_by_task_and_attack(tmp_path):
    """As report.json records an AdaMerging + SAU merge: the title and the backdoor rows come
    from the method, granularity, defence and the expert's place in the pool."""
    experts = ["/cache/experts/mini_shapes-1", "/cache/experts/mini_fashion-optimizedpatch-2"]
    report = build_report(
        "adamerging",
        {
            "mini_shapes": {"accuracy": 0.9, "asr": None, "expert_accuracy": 0.95},
            "mini_fashion": {"accuracy": 0.7, "asr": None, "expert_accuracy": 0.8},
        },
        config={"method": {"name": "adamerging", "granularity": "layer"}, "experts": experts},
        runtime_s=1.0,
        backdoors=[
            {
                "expert": experts[1],
                "attack": "optimized_patch",
                "target_task": "mini_shapes",
                "target_class": 0,
                "asr": 0.25,
                "target_rate": 0.01,
            }
        ],
        defense={"name": "sau", "params": {"steps": 100}},
    )
    write_report(tmp_path, report)
    text = (tmp_path / "report.md").read_text()
    assert text.splitlines()[0] == "# AdaMerging (layer-wise) + SAU"
    assert "| mini_fashion (optimized_patch) | mini_shapes:0 | 25.0 | 1.0 |" in text
    assert experts[1] not in text and read_report(tmp_path)["backdoors"][0]["expert"] == experts[1]
    write_report(
        tmp_path / "ties", build_report("ties", report["tasks"], config={"method": {"name": "ties"}}, runtime_s=1.0)
    )
    assert (tmp_path / "ties" / "report.md").read_text().splitlines()[0] == "# TIES"
