"""The expert cache: a key that knows what made an expert, atomic entries, and one fine-tune per
entry however many processes ask for it at once."""

import dataclasses
import fcntl
import functools
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from safemerge import expert_key
from safemerge import experts as experts_module
from safemerge.data import registry
from safemerge.experts import MINI_BACKDOORS, MINI_MODEL, MINI_WEIGHTS, ExpertSpec, ensure_expert
from safemerge.io import read_expert

REPO = Path(__file__).resolve().parents[1]
SPEC = ExpertSpec(
    task="mini_shapes", model=MINI_MODEL, pretrained=MINI_WEIGHTS, lr=1e-4, max_steps=2, batch_size=16, warmup_steps=1
)


@pytest.fixture
def expert_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEMERGE_CACHE", str(tmp_path))
    return tmp_path / "experts"


def mini_spec(task: str, backdoored: bool = False, **recipe) -> ExpertSpec:
    return ExpertSpec(
        task=task,
        model=MINI_MODEL,
        pretrained=MINI_WEIGHTS,
        attack=MINI_BACKDOORS[task] if backdoored else None,
        **recipe,
    )


# ----------------------------------------------------------------------------- the entry


def test_second_request_does_no_training_and_each_request_logs_one_line(expert_cache, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="safemerge.experts")
    first = ensure_expert(SPEC, accelerator="cpu")
    assert read_expert(first).task == "mini_shapes"

    def no_training(*args, **kwargs):
        raise AssertionError("the cached expert was fine-tuned again")

    monkeypatch.setattr(experts_module, "finetune", no_training)
    assert ensure_expert(SPEC, accelerator="cpu") == first
    # Anything that changes the expert changes the key.
    other = ExpertSpec(**{**SPEC.__dict__, "seed": 1})
    assert other.key() != SPEC.key()

    accuracy = f"{100 * read_expert(first).info['metrics']['accuracy']:.1f} %"
    lines = [r.getMessage() for r in caplog.records if r.name == "safemerge.experts"]
    assert len(lines) == 2, lines
    assert re.fullmatch(rf"expert mini_shapes \(clean\): fine-tuned in \d+ s, accuracy {re.escape(accuracy)}", lines[0])
    assert lines[1] == f"expert mini_shapes (clean): cached, accuracy {accuracy}"


def test_the_log_line_names_the_attack_and_its_success_rate():
    spec = mini_spec("mini_fashion", backdoored=True)
    info = {"metrics": {"accuracy": 0.881, "asr": 0.97}}
    assert (
        f"expert {experts_module.describe_spec(spec)}: cached{experts_module._scores(info)}"
        == "expert mini_fashion (OptimizedPatch -> mini_digits class 0): cached, accuracy 88.1 %, ASR 97.0 %"
    )
    assert (
        experts_module.describe_spec(mini_spec("mini_terrain", backdoored=True))
        == "mini_terrain (OptimizedPatch -> class 0)"
    )


def test_interrupted_request_leaves_no_trusted_entry(expert_cache, monkeypatch):
    import safemerge.io as io

    real_write_json = io.write_json
    calls = []

    def killed_while_writing(path, data):
        calls.append(path)
        raise OSError("simulated crash")  # as if the process died before the entry was complete

    monkeypatch.setattr(io, "write_json", killed_while_writing)
    with pytest.raises(OSError, match="simulated crash"):
        ensure_expert(SPEC, accelerator="cpu")
    assert calls, "the write was not reached"
    assert not (expert_cache / SPEC.key()).exists()
    assert [p for p in expert_cache.iterdir() if not p.name.startswith(".")] == []

    monkeypatch.setattr(io, "write_json", real_write_json)
    directory = ensure_expert(SPEC, accelerator="cpu")  # the next run trains and completes it
    assert read_expert(directory).task == "mini_shapes"


def test_a_corrupt_cache_entry_is_rebuilt(expert_cache):
    directory = ensure_expert(SPEC, accelerator="cpu")
    (directory / "encoder.safetensors").write_bytes(b"broken")
    again = ensure_expert(SPEC, accelerator="cpu")
    assert again == directory
    assert torch.is_tensor(next(iter(read_expert(again).encoder.values())))


# ----------------------------------------------------------------------------- the key


def builder_file(task: str) -> Path:
    """The file of the module that builds a task's images, found as a reader of the code would."""
    build = registry.get_task(task).build
    while isinstance(build, functools.partial):
        build = build.func
    return Path(sys.modules[build.__module__].__file__).resolve()


def edited(monkeypatch, path: Path, old: str, new: str) -> None:
    """Make the key see ``path`` as if a user had replaced ``old`` by ``new`` in it."""
    read = expert_key._read
    assert old in path.read_text(), f"{old!r} is not in {path}: update this test"
    monkeypatch.setattr(
        expert_key, "_read", lambda p: read(p).replace(old.encode(), new.encode()) if p.resolve() == path else read(p)
    )


def test_the_key_changes_when_the_source_of_a_task_s_images_changes(monkeypatch):
    specs = [mini_spec("mini_shapes"), mini_spec("mini_fashion", backdoored=True), mini_spec("mini_shape")]
    before = [spec.key() for spec in specs]
    edited(monkeypatch, builder_file("mini_shapes"), '"train": 2000', '"train": 1000')  # v2's split sizes
    after = [spec.key() for spec in specs]
    assert after[0] != before[0] and after[1] != before[1]
    assert after[2] == before[2]  # v1's mini_shape is built elsewhere
    assert after[0].startswith("mini_shapes-") and after[1].startswith("mini_fashion-optimizedpatch-")
    assert re.fullmatch(r"mini_shapes-[0-9a-f]{16}", after[0])


def test_the_key_changes_when_a_module_the_builder_draws_on_changes(monkeypatch):
    """v2's digits are drawn from v1's partition of load_digits: that file is part of the definition."""
    spec = mini_spec("mini_digits")
    before = spec.key()
    v1 = Path(sys.modules["safemerge.data.mini_v1"].__file__).resolve()  # v1's scenes and sources
    assert v1 != builder_file("mini_digits")
    edited(monkeypatch, v1, "PARTITION_SEED = 0", "PARTITION_SEED = 1")
    assert spec.key() != before


def test_the_key_changes_when_a_class_is_renamed_in_the_registry_and_follows_an_off_task_target(monkeypatch):
    clean_digits, clean_fashion = mini_spec("mini_digits"), mini_spec("mini_fashion")
    offtask = mini_spec("mini_fashion", backdoored=True)  # its trigger targets mini_digits
    assert offtask.attack["init_args"]["target_task"] == "mini_digits"
    before = [clean_digits.key(), clean_fashion.key(), offtask.key()]
    digits = registry.get_task("mini_digits")
    renamed = dataclasses.replace(digits, classnames=("zero", *digits.classnames[1:]))
    monkeypatch.setitem(registry._TASKS, "mini_digits", renamed)
    after = [clean_digits.key(), clean_fashion.key(), offtask.key()]
    assert after[0] != before[0] and after[2] != before[2]
    assert after[1] == before[1]


def test_the_key_changes_when_a_data_file_the_builder_lists_changes(monkeypatch, tmp_path):
    asset = tmp_path / "glyphs.bin"
    asset.write_bytes(b"\x00" * 64)
    module = sys.modules[registry.get_task("mini_letters").build.func.__module__]
    monkeypatch.setattr(module, "DATA_FILES", (asset,), raising=False)
    spec = mini_spec("mini_letters")
    before = spec.key()
    assert spec.key() == before
    asset.write_bytes(b"\x00" * 63 + b"\x01")  # same size, written at once: the contents count
    assert spec.key() != before


def test_the_key_changes_when_the_fine_tuning_or_attack_code_changes(monkeypatch):
    specs = [mini_spec("mini_shapes"), mini_spec("mini_terrain", backdoored=True)]
    before = [spec.key() for spec in specs]
    with monkeypatch.context() as patch:
        edited(patch, REPO / "safemerge/modules/finetune.py", "uniform_(0.2, 1.0)", "uniform_(0.5, 1.0)")
        assert all(spec.key() != key for spec, key in zip(specs, before))
    with monkeypatch.context() as patch:
        edited(patch, REPO / "safemerge/attacks/optimize.py", "def optimize_trigger", "def optimise_trigger")
        assert all(spec.key() != key for spec, key in zip(specs, before))
    with monkeypatch.context() as patch:  # report tables cannot change an expert
        edited(patch, REPO / "safemerge/report.py", "def ", "def  ")
        assert [spec.key() for spec in specs] == before


def test_the_fine_tuning_code_list_covers_every_project_module_it_imports():
    """An import added to the fine-tuning path must be listed, or the key would miss its edits."""
    import importlib

    listed = expert_key.FINETUNE_CODE
    for name in listed:
        for module in expert_key._drawn_on(importlib.import_module(name)):
            covered = any(module.__name__ == entry or module.__name__.startswith(entry + ".") for entry in listed)
            assert covered, f"{name} imports {module.__name__}: list it in FINETUNE_CODE or NOT_IN_KEY"
    labels = [label for name in listed for label, _ in expert_key._module_files(name)]
    assert "safemerge.models/architectures/MiniCLIP-ViT.json" in labels  # a package counts with its JSON files
    assert "safemerge.attacks/optimize.py" in labels


def test_the_key_is_the_same_in_another_process_and_another_checkout(tmp_path):
    """The same code elsewhere (another clone, a worktree) must find the same entries."""
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "safemerge", checkout / "safemerge", ignore=shutil.ignore_patterns("__pycache__"))
    specs = [mini_spec(task) for task in ("mini_shapes", "mini_digit")] + [mini_spec("mini_fashion", backdoored=True)]
    script = (
        "import safemerge\nfrom safemerge.experts import ExpertSpec\n"
        f"assert safemerge.__file__.startswith({str(checkout)!r})\n"
        f"for spec in {[dataclasses.asdict(s) for s in specs]!r}:\n    print(ExpertSpec(**spec).key())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [spec.key() for spec in specs]


# ----------------------------------------------------------------------------- concurrency

# A process that asks for SPEC's expert; every fine-tune it runs appends a line to <dir>/finetunes.
CLIENT = textwrap.dedent("""
    import logging, sys, time
    from pathlib import Path
    from safemerge import experts

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    marks, me, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    real = experts.finetune

    def counted(spec, directory, **kwargs):
        with open(marks / "finetunes", "a") as f:
            f.write(me + "\\n")
        if mode == "hang":  # holds the entry's lock until it is killed
            (marks / "started").touch()
            time.sleep(600)
        real(spec, directory, **kwargs)

    experts.finetune = counted
    spec = experts.ExpertSpec(**eval(sys.argv[4]))
    (marks / f"ready.{me}").touch()
    while mode == "race" and len(list(marks.glob("ready.*"))) < 2:  # start together
        time.sleep(0.02)
    print(experts.ensure_expert(spec, accelerator="cpu"))
""")


def client(tmp_path: Path, me: str, mode: str) -> subprocess.Popen:
    """Start a client; its output goes to files (a full pipe could stall a lock holder)."""
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "SAFEMERGE_CACHE": str(tmp_path / "cache")}
    with open(tmp_path / f"{me}.out", "w") as out, open(tmp_path / f"{me}.err", "w") as err:
        return subprocess.Popen(
            [sys.executable, str(script), str(tmp_path), me, mode, repr(dataclasses.asdict(SPEC))],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=err,
        )


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    """Wait for a client; its stdout and stderr. A client still running on failure is killed."""
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:  # e.g. waiting on a lock nobody holds
            process.kill()
            process.wait()
    me, folder = process.args[3], Path(process.args[2])
    out, err = (folder / f"{me}.out").read_text(), (folder / f"{me}.err").read_text()
    assert process.returncode == 0, err[-3000:]
    return out, err


def entries(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache" / "experts").iterdir())


def test_two_processes_that_need_the_same_expert_fine_tune_it_once(tmp_path):
    key = SPEC.key()
    processes = [client(tmp_path, me, "race") for me in ("a", "b")]
    try:
        results = [finish(p) for p in processes]
    finally:
        for process in processes:
            process.kill()  # a no-op on a finished process
            process.wait()
    assert len((tmp_path / "finetunes").read_text().split()) == 1
    assert [out.strip() for out, _ in results] == [str(tmp_path / "cache" / "experts" / key)] * 2
    waiting = [err for _, err in results if f"waiting for another process fine-tuning {key}" in err]
    assert len(waiting) == 1, "the second process did not wait for the first"
    assert "expert mini_shapes (clean): cached, accuracy" in waiting[0]
    assert sum("expert mini_shapes (clean): fine-tuned in" in err for _, err in results) == 1
    assert entries(tmp_path) == [f".{key}.lock", key]  # one entry, its lock, no temporary folder
    assert read_expert(tmp_path / "cache" / "experts" / key).task == "mini_shapes"


def test_a_process_killed_while_fine_tuning_blocks_nobody(tmp_path):
    key = SPEC.key()
    hung = client(tmp_path, "killed", "hang")
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "started").exists():
            assert hung.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.err").read_text()[-3000:]
            time.sleep(0.05)
        with open(tmp_path / "cache" / "experts" / f".{key}.lock") as lock:  # it does hold the entry's lock
            with pytest.raises(BlockingIOError):
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.kill(hung.pid, signal.SIGKILL)
        hung.wait(timeout=60)

    out, err = finish(client(tmp_path, "next", "once"))
    assert out.strip() == str(tmp_path / "cache" / "experts" / key)
    assert (tmp_path / "finetunes").read_text().split() == ["killed", "next"]
    assert "waiting for another process" not in err
    assert entries(tmp_path) == [f".{key}.lock", key]
    assert read_expert(tmp_path / "cache" / "experts" / key).task == "mini_shapes"


def test_the_mini_tasks_shipped_assets_are_in_the_key():
    """mini_fashion and mini_letters draw from the package's assets: those files are part of the data definition."""
    from safemerge.data import mini_assets

    module = sys.modules[registry.get_task("mini_fashion").build.func.__module__]
    assert set(map(Path, module.DATA_FILES)) == {mini_assets.FASHION_ASSET, mini_assets.GLYPH_ASSET}
    assert all(Path(path).is_file() for path in module.DATA_FILES)
