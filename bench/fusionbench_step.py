"""FusionBench's side of benchmark 1 (run by bench/merged_step.py with the FusionBench venv).

Uses ``fusion_bench.models.wrappers.layer_wise_fusion.LayerWiseMergedModel`` the way FusionBench's
algorithms do (clamp_weights=False, tie_weights=True, strict=False, as in their CLIP configs):

  fb         Concrete AdaMerging's mask step (fusion_bench/method/concrete_subspace/
             clip_concrete_adamerging.py, ``train_mask``): MaskModel.sample_mask("continuous"),
             each mask divided by its mean, ``merge_weights(task_vector_mask=mask)``, one forward
             per task, the entropies summed, one backward (grads → layer-wise λ and mask logits).
  fb_concat  the same with the tasks' images concatenated into one forward (as ours does).
  fb_lambda  layer-wise AdaMerging's step (fusion_bench/method/adamerging/layer_wise_adamerging.py,
             ``test_time_adaptation``): ``merge_weights()``, then per task forward and
             ``backward(retain_graph=True)`` (grads → λ).

The tower, experts, heads and images are those of bench/common.py (open_clip, random weights).

    /work/venv-fb/bin/python bench/fusionbench_step.py --variant fb --num-tasks 4
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def worker(args) -> dict:
    import torch
    import torch.nn.functional as F
    from fusion_bench.method.adamerging.entropy_loss import entropy_loss
    from fusion_bench.models.masks.mask_model import MaskModel
    from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel, get_layer_wise_weights

    common.setup_torch(args)
    memory = common.Memory(args.device)
    T, B, device = args.num_tasks, args.batch, args.device
    pretrained = common.make_tower(args.model, device)
    heads = common.make_heads(T, common.output_dim(pretrained, args.image_size), args.classes, args.seed, device)
    images = common.make_images(T, B, args.seed, device, size=args.image_size)
    tasks = list(images)

    finetuned = []
    for i in range(T):  # the same synthetic experts as ours: base + 1e-3 randn
        model = copy.deepcopy(pretrained)
        model.load_state_dict(common.expert_state(pretrained, i, args.seed))
        finetuned.append(model)
    use_mask = args.variant in ("fb", "fb_concat")
    mask_model = None
    if use_mask:  # as setup_models(): built from the pretrained model before it is frozen
        mask_model = MaskModel(pretrained, ignore_untrained_params=True, parameter_type="logits").to(device)
        mask_model.fill_(0.0)
    num_layers = len([p for p in pretrained.parameters() if p.requires_grad])
    module = LayerWiseMergedModel(
        layer_wise_weight=get_layer_wise_weights(T, num_layers, init_values=0.3).to(device),
        pretrained_model=pretrained,
        finetuned_models=finetuned,
        clamp_weights=False,
        tie_weights=True,
        strict=False,
    )
    del finetuned
    module.train()

    def compute_logits(x, task):  # CLIPClassificationMixin.compute_logits for an open_clip tower
        features = module(common.normalize(x))
        features = features / features.norm(p=2, dim=-1, keepdim=True)
        return features.to(heads[task].dtype) @ heads[task].T

    def zero_grad():
        module.merge_weight.grad = None
        if mask_model is not None:
            mask_model.zero_grad(set_to_none=True)

    def sample_mask():
        mask = mask_model.sample_mask(mask_type="continuous", temperature=0.5)
        return {name: m / torch.mean(m) for name, m in mask.items()}

    def losses():
        if args.variant == "fb_concat":
            features = module(common.normalize(torch.cat([images[t] for t in tasks])))
            features = F.normalize(features, dim=-1).split(B)
            return [entropy_loss(f @ heads[t].T) for t, f in zip(tasks, features)]
        return [entropy_loss(compute_logits(images[t], t)) for t in tasks]

    if use_mask:

        def step():
            with common.autocast(args):
                module.merge_weights(task_vector_mask=sample_mask())
                total_loss = sum(losses())
            total_loss.backward()
            zero_grad()
    else:

        def step():
            with common.autocast(args):
                module.merge_weights()
            for task in tasks:
                with common.autocast(args):
                    loss = entropy_loss(compute_logits(images[task], task))
                loss.backward(retain_graph=True)
            zero_grad()

    def breakdown():
        marks = [time.perf_counter()]

        def mark():
            common.synchronize(device)
            marks.append(time.perf_counter())

        learned = [module.merge_weight, *(mask_model.parameters() if use_mask else ())]
        with common.autocast(args):
            mask = sample_mask() if use_mask else None
            mark()
            state = module.merge_weights(task_vector_mask=mask)
            mark()
            loss = sum(losses())
            mark()
        names = [n for n, _ in module.task_vectors[0].named_parameters()]
        merged = [state[n] for n in names]
        grads = torch.autograd.grad(loss, merged)
        mark()
        torch.autograd.grad(merged, learned, grads)
        mark()
        keys = ("sample_mask_s", "build_weights_s", "forward_s", "backward_tower_s", "backward_merge_s")
        return {k: b - a for k, a, b in zip(keys, marks, marks[1:])}

    memory.setup_done()
    times = common.time_steps(step, args.warmup, args.steps, device)
    info = memory.steps_done()
    parts = breakdown() if args.breakdown else {}
    return {
        "variant": args.variant,
        "tasks": T,
        "batch": B,
        **common.summarize(times),
        **info,
        "breakdown": parts,
        "num_layers": num_layers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser, tasks="4")
    parser.add_argument("--variant", default="fb", choices=("fb", "fb_concat", "fb_lambda"))
    parser.add_argument("--num-tasks", type=int, default=4)
    parser.add_argument("--breakdown", action="store_true")
    common.emit(worker(parser.parse_args()))


if __name__ == "__main__":
    main()
