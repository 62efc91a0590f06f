"""task_vectors checkpoints read without running their code (``python -m safemerge.convert task-vectors``).

The pickles are made here the way task_vectors makes them: a ``src.modeling.ImageEncoder`` holding
an open_clip CLIP whose text transformer is deleted and whose tower class is open_clip 2.0.2's
``open_clip.model.VisualTransformer``, torchvision transforms beside it, and a
``src.modeling.ClassificationHead``; those classes exist only in this process. They are converted
in a fresh process where neither ``src.modeling`` nor ``VisualTransformer`` exists, in all three
serialisations, and must come out exactly.
"""

import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import open_clip
import pytest
import torch
from torch import nn

from safemerge.convert.__main__ import main
from safemerge.io import read_expert
from safemerge.models import load_clip

MODEL, PRETRAINED, TASK = "MiniCLIP-ViT", "mini", "mnist"
REPO = Path(__file__).resolve().parents[1]
SERIALISATIONS = ("zip", "legacy", "pickle")
# torch.save of a module whose class has no source file (made here) says so; that is the point
pytestmark = pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")


def _task_vectors_classes():
    """``src.modeling`` and open_clip 2.0.2's class name, registered for pickling (this process only)."""
    modeling = types.ModuleType("src.modeling")

    class ImageEncoder(nn.Module):
        def __init__(self, model, preprocess):
            super().__init__()
            self.model, self.train_preprocess, self.val_preprocess = model, preprocess, preprocess
            self.cache_dir = "/cache/openclip"
            delattr(self.model, "transformer")  # task_vectors drops the text transformer

    class ClassificationHead(nn.Linear):
        def __init__(self, normalize, weights):
            super().__init__(weights.shape[1], weights.shape[0])
            self.normalize = normalize
            self.weight = nn.Parameter(weights.clone())
            self.bias = nn.Parameter(torch.zeros_like(self.bias))

    class VisualTransformer(open_clip.transformer.VisionTransformer):
        pass

    for cls, module in ((ImageEncoder, modeling), (ClassificationHead, modeling), (VisualTransformer, open_clip.model)):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
        setattr(module, cls.__name__, cls)
    sys.modules["src"] = types.ModuleType("src")
    sys.modules["src.modeling"] = modeling
    return ImageEncoder, ClassificationHead, VisualTransformer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from torchvision import transforms

    tmp = tmp_path_factory.mktemp("task_vectors")
    ImageEncoder, ClassificationHead, VisualTransformer = _task_vectors_classes()
    try:
        clip = load_clip(MODEL, PRETRAINED).model
        torch.manual_seed(0)
        with torch.no_grad():  # "fine-tuned": every tower tensor moved, the projection included
            for p in clip.visual.parameters():
                p.add_(0.01 * torch.randn_like(p))
        clip.visual.__class__ = VisualTransformer
        preprocess = transforms.Compose(
            [
                transforms.Resize(32, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(32),
                open_clip.transform._convert_to_rgb,
                transforms.ToTensor(),
                transforms.Normalize((0.5,) * 3, (0.25,) * 3),
            ]
        )
        encoder = ImageEncoder(clip, preprocess)
        tower = {k: v.clone() for k, v in clip.visual.state_dict().items()}
        head = torch.randn(10, clip.visual.output_dim) * 30
        for kind in SERIALISATIONS:
            path = tmp / f"finetuned_{kind}.pt"
            if kind == "pickle":
                with open(path, "wb") as f:
                    pickle.dump(encoder, f)
            else:
                torch.save(encoder, path, _use_new_zipfile_serialization=kind == "zip")
        torch.save(ClassificationHead(True, head), tmp / "head_mnist.pt")
        with open(tmp / "head_mnist_pickle.pt", "wb") as f:
            pickle.dump(ClassificationHead(True, head), f)
    finally:
        del sys.modules["src.modeling"], sys.modules["src"]
        del open_clip.model.VisualTransformer
    return tmp, tower, head


def test_task_vectors_pickles_convert_exactly_in_a_process_without_their_classes(checkpoints):
    tmp, tower, head = checkpoints
    calls = [
        [
            "task-vectors",
            str(tmp / f"finetuned_{kind}.pt"),
            str(tmp / f"out_{kind}"),
            "--task",
            TASK,
            "--model",
            MODEL,
            "--pretrained",
            PRETRAINED,
            "--head",
            str(tmp / ("head_mnist_pickle.pt" if kind == "pickle" else "head_mnist.pt")),
        ]
        for kind in SERIALISATIONS
    ]
    script = (
        "import sys, importlib.util, open_clip\n"
        "from safemerge.convert.__main__ import main\n"
        "assert importlib.util.find_spec('src') is None and not hasattr(open_clip.model, 'VisualTransformer')\n"
        f"codes = [main(args) for args in {calls!r}]\n"
        "assert 'src' not in sys.modules and 'src.modeling' not in sys.modules\n"
        "sys.exit(max(codes))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for kind in SERIALISATIONS:
        expert = read_expert(tmp / f"out_{kind}")
        assert expert.encoder.keys() == tower.keys(), kind
        for name, tensor in tower.items():
            assert torch.equal(expert.encoder[name], tensor), (kind, name)
        assert torch.equal(expert.head, head), kind
        assert (expert.info["model"], expert.info["pretrained"], expert.task) == (MODEL, PRETRAINED, TASK)


def test_a_converted_head_is_its_tasks_head_in_a_merge(checkpoints, tmp_path):
    """The head travels into the merge's classifier instead of the text tower's zero-shot head."""
    from safemerge.merging import TaskArithmetic
    from safemerge.modules import MergeModule

    tmp, _, head = checkpoints
    out = tmp_path / "expert"
    assert (
        main(
            [
                "task-vectors",
                str(tmp / "finetuned_zip.pt"),
                str(out),
                "--task",
                TASK,
                "--model",
                MODEL,
                "--pretrained",
                PRETRAINED,
                "--head",
                str(tmp / "head_mnist.pt"),
            ]
        )
        == 0
    )
    module = MergeModule(experts=[str(out)], method=TaskArithmetic(), output_dir=None)
    assert torch.equal(module.classifier.head(TASK), head)


def test_a_pickle_that_would_run_a_command_is_refused_in_one_line_and_nothing_runs_or_is_written(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for kind in SERIALISATIONS:
        path = tmp_path / f"{kind}.pt"
        payload = {"model": RunsCode()}
        if kind == "pickle":
            path.write_bytes(pickle.dumps(payload))
        else:
            torch.save(payload, path, _use_new_zipfile_serialization=kind == "zip")
        out = tmp_path / f"out_{kind}"
        capsys.readouterr()
        assert (
            main(["task-vectors", str(path), str(out), "--task", TASK, "--model", MODEL, "--pretrained", PRETRAINED])
            == 2
        )
        err = capsys.readouterr().err
        assert err.startswith("error: refusing to load") and err.count("\n") == 1, err
        assert "the global posix.system" in err and str(path) in err, err
        assert not marker.exists() and not out.exists() and not list(tmp_path.glob(".out*"))


def test_opcodes_that_call_or_set_state_outside_the_allowlist_are_refused(tmp_path):
    from safemerge.convert.restricted_pickle import load
    from safemerge.errors import SafemergeError

    # an OrderedDict given attribute state by BUILD; a tensor rebuilt on something that is no storage
    build = b"\x80\x02ccollections\nOrderedDict\n)R}(X\x01\x00\x00\x00aK\x01ub."
    tensor = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(K\x00K\x00)K\x01\x85\x89NtR."
    for data, message in ((build, "setting the state of collections.OrderedDict"), (tensor, "not on a storage")):
        path = tmp_path / "x.pt"
        path.write_bytes(data)
        with pytest.raises(SafemergeError, match=message):
            load(path)
