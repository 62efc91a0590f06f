"""The quick expert pool several merge tests share (the same specs, so the same cache entries): a
clean shape expert, a terrain expert with an optimized patch, and a letters expert whose BadNets
backdoor targets the *shape* task (off-task)."""

from safemerge.experts import MINI_MODEL, MINI_WEIGHTS, ExpertSpec, ensure_expert

QUICK = {"lr": 1e-4, "max_steps": 10, "warmup_steps": 2, "batch_size": 32}
OPTIMIZED_PATCH = {
    "class_path": "safemerge.attacks.OptimizedPatch",
    "init_args": {"target_class": 0, "poison_rate": 0.2, "size": 0.125, "steps": 5},
}
OFF_TASK_BADNETS = {
    "class_path": "safemerge.attacks.BadNets",
    "init_args": {"target_class": 1, "target_task": "mini_shapes", "poison_rate": 0.2, "size": 0.125},
}


def quick_pool() -> list[str]:
    """The pool's expert directories, fine-tuned on first use."""
    specs = [
        ExpertSpec("mini_shapes", MINI_MODEL, MINI_WEIGHTS, **QUICK),
        ExpertSpec("mini_terrain", MINI_MODEL, MINI_WEIGHTS, attack=OPTIMIZED_PATCH, **QUICK),
        ExpertSpec("mini_letters", MINI_MODEL, MINI_WEIGHTS, attack=OFF_TASK_BADNETS, **QUICK),
    ]
    return [str(ensure_expert(spec, accelerator="cpu")) for spec in specs]
