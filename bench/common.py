"""Shared helpers of the benchmarks: synthetic models and data, timing, memory, machine info.

Only torch and open_clip are imported here (no safemerge), so that the FusionBench worker, which
runs in its own venv, can use the same model, experts, heads and images.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
FB_PYTHON = os.environ.get("FB_PYTHON", "/work/venv-fb/bin/python")

# OpenAI CLIP's pixel statistics (open_clip.OPENAI_DATASET_MEAN / STD).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------- command line


def add_common_args(parser, tasks: str) -> None:
    parser.add_argument(
        "--tasks", default=tasks, help="comma-separated numbers of task vectors T, one fresh process each"
    )
    parser.add_argument("--batch", type=int, default=8, help="images per task")
    parser.add_argument("--steps", type=int, default=3, help="measured steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights)")
    parser.add_argument("--image-size", type=int, default=224, help="image side in pixels (the model's own size)")
    parser.add_argument("--classes", type=int, default=10, help="classes per task head")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="autocast the forward in bfloat16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--src",
        default=None,
        help="benchmark the safemerge package of this source tree instead of the repo's (e.g. a worktree of an older commit)",
    )
    parser.add_argument(
        "--out", default=None, help="JSON file for the results (default: bench/results/<script>_<device>.json)"
    )


def setup_torch(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


def autocast(args):
    if not args.bf16:
        return nullcontext()
    return torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16)


# ---------------------------------------------------------------- synthetic models and data


def make_tower(model: str, device: str = "cpu") -> torch.nn.Module:
    """The image tower of an open_clip architecture with random weights (no download); also
    safemerge's own tiny architectures (``TinyCLIP-ViT-32``), for quick checks of the scripts."""
    import open_clip

    open_clip.add_model_config(ROOT / "safemerge" / "models" / "architectures")
    return open_clip.create_model(model, pretrained=None).visual.to(device).eval()


def expert_state(tower: torch.nn.Module, index: int, seed: int, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    """A synthetic fine-tuned expert: the base plus ``scale * randn`` on every floating tensor."""
    generator = torch.Generator().manual_seed(seed * 1000 + index + 1)
    out = {}
    for name, tensor in tower.state_dict().items():
        if tensor.is_floating_point():
            noise = torch.randn(tensor.shape, generator=generator).to(tensor.device, tensor.dtype)
            out[name] = tensor + scale * noise
        else:
            out[name] = tensor.clone()
    return out


def output_dim(tower: torch.nn.Module, image_size: int = 224) -> int:
    with torch.no_grad():
        device = next(tower.parameters()).device
        return tower(torch.zeros(1, 3, image_size, image_size, device=device)).shape[-1]


def make_heads(num_tasks: int, dim: int, classes: int, seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Random unit-norm zero-shot heads scaled by 100 (CLIP's logit scale), ``task -> [C, D]``."""
    generator = torch.Generator().manual_seed(seed + 12345)
    return {
        f"task{t}": (100 * F.normalize(torch.randn(classes, dim, generator=generator), dim=-1)).to(device)
        for t in range(num_tasks)
    }


def make_images(num_tasks: int, batch: int, seed: int, device: str = "cpu", size: int = 224) -> dict[str, torch.Tensor]:
    """``task -> [B, 3, size, size]`` pixels in [0, 1]."""
    generator = torch.Generator().manual_seed(seed + 777)
    return {f"task{t}": torch.rand(batch, 3, size, size, generator=generator).to(device) for t in range(num_tasks)}


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


# ---------------------------------------------------------------- timing and memory


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, warmup: int, steps: int, device: str = "cpu") -> list[float]:
    """Seconds of each measured call of ``step()`` (after ``warmup`` unmeasured ones)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak RSS since the last :func:`reset_peak_rss` (VmHWM)."""
    return _status_mb("VmHWM")


def ru_maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def trim() -> None:
    """Collect garbage and hand freed heap memory back to the OS, so set-up leftovers don't count."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM, and ru_maxrss with it) to the current RSS (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Memory:
    """Records RSS at the phases of a worker: after imports, after set-up, peak during the steps."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.info = {"rss_import_mb": rss_mb()}

    def setup_done(self) -> None:
        trim()
        self.info["ru_maxrss_setup_mb"] = ru_maxrss_mb()  # includes the set-up's transient peak
        self.info["rss_base_mb"] = rss_mb()
        self.info["peak_reset"] = reset_peak_rss()
        if torch.device(self.device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.info["cuda_base_mb"] = torch.cuda.memory_allocated() / 2**20

    def steps_done(self) -> dict:
        self.info["peak_rss_mb"] = peak_rss_mb() if self.info["peak_reset"] else ru_maxrss_mb()
        self.info["ru_maxrss_mb"] = ru_maxrss_mb()
        self.info["step_extra_mb"] = self.info["peak_rss_mb"] - self.info["rss_base_mb"]
        if torch.device(self.device).type == "cuda":
            self.info["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return self.info


def summarize(times: list[float]) -> dict:
    return {"times_s": times, "median_s": statistics.median(times), "min_s": min(times)}


def emit(result: dict) -> None:
    """A worker's result: one JSON line on stdout, tagged for the driver."""
    if "safemerge" in sys.modules:
        result["safemerge"] = str(Path(sys.modules["safemerge"].__file__).parent)
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- driver side


def run_worker(argv: list[str], python: str = sys.executable, timeout: float = 900, src: str | None = None) -> dict:
    """Run one worker in a fresh process and return its result (or the error)."""
    path = [str(Path(src).resolve())] if src else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*path, str(ROOT), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    proc = subprocess.run([python, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            result["process_wall_s"] = wall
            return result
    return {"error": f"exit {proc.returncode}", "stderr": proc.stderr[-3000:], "argv": argv}


def forwarded_args(args) -> list[str]:
    """The common options, to pass on to a worker."""
    out = [
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--model",
        args.model,
        "--image-size",
        str(args.image_size),
        "--classes",
        str(args.classes),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
    ]
    return out + (["--bf16"] if args.bf16 else [])


def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        with open("/proc/meminfo") as f:
            ram = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) / 2**20
    except (OSError, StopIteration):
        ram = float("nan")
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(ram, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def save(results: dict, args, script: str) -> Path:
    path = Path(args.out) if args.out else RESULTS / f"{script}_{args.device}{'_bf16' if args.bf16 else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    return path
