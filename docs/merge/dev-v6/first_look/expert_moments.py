"""Run from the repository root with PYTHONPATH=. (a first look, before safemerge/merging/subspace.py existed).
Per-expert projection: each expert's task vector restricted, per matrix, to the principal
subspace (energy fraction rho) of its own task's clean val inputs under that expert.
Usage: expert_moments.py POOL rho..."""

import json
import sys

import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader

from safemerge.data import get_task
from safemerge.evaluation import classifier_for, evaluate_backdoors
from safemerge.experts import MINI_MODEL, MINI_WEIGHTS, resolve_expert
from safemerge.io import read_expert
from safemerge.merging.arithmetic import task_arithmetic, tsv_merging
from safemerge.models import load_clip
from safemerge.pool import backdoors_of
from safemerge.report import mean_known

torch.set_num_threads(1)
pool = sys.argv[1]
rhos = [float(r) for r in sys.argv[2:]]
refs = yaml.safe_load(open(f"configs/pools/{pool}.yaml"))["model"]["init_args"]["experts"]
clip = load_clip(MINI_MODEL, MINI_WEIGHTS)
base = {k: v.detach().clone() for k, v in clip.visual.state_dict().items()}
experts = [(r, read_expert(resolve_expert(r))) for r in refs]
tasks = [get_task(e.task) for _, e in experts]
backdoors, infos = backdoors_of(experts, [t.name for t in tasks])
clf = classifier_for(clip, tasks)


def measure(state):
    per_task, per_bd = evaluate_backdoors(clf, tasks, backdoors, tower_state=state, image_size=clip.image_size)
    return {
        "acc": round(100 * mean_known([t["accuracy"] for t in per_task.values()]), 2),
        "asr": [round(100 * b["asr"], 1) for b in per_bd],
        "acc_tasks": [round(100 * t["accuracy"], 1) for t in per_task.values()],
    }


def covariances(state, task):
    clf.tower.load_state_dict(state)
    v = clf.tower
    cov, count = {}, {}

    def add(name, a):
        a = a.reshape(-1, a.shape[-1]).double()
        cov[name] = cov.get(name, 0) + a.T @ a
        count[name] = count.get(name, 0) + len(a)

    def pre(name):
        return lambda mod, args: add(name, args[0].detach())

    hooks = [
        v.conv1.register_forward_pre_hook(
            lambda m, a: add("conv1.weight", F.unfold(a[0].detach(), 8, stride=8).transpose(1, 2))
        )
    ]
    for i, blk in enumerate(v.transformer.resblocks):
        p = f"transformer.resblocks.{i}."
        hooks.append(blk.attn.register_forward_pre_hook(pre(p + "attn.in_proj_weight")))
        hooks.append(blk.mlp.c_fc.register_forward_pre_hook(pre(p + "mlp.c_fc.weight")))
        hooks.append(blk.mlp.c_proj.register_forward_pre_hook(pre(p + "mlp.c_proj.weight")))
    with torch.no_grad():
        ds = task.build("val", root=None, image_size=clip.image_size, download=False, seed=0)
        for images, _ in DataLoader(ds, batch_size=256):
            clf(images, task.name)
    for h in hooks:
        h.remove()
    return {n: torch.linalg.eigh(c / count[n]) for n, c in cov.items()}


eig = [covariances(e.encoder, t) for (_, e), t in zip(experts, tasks)]
out = {
    "pool": pool,
    "backdoors": infos,
    "tsv": measure(tsv_merging(base, [e.encoder for _, e in experts], 1.25)),
    "ta0.3": measure(task_arithmetic(base, [e.encoder for _, e in experts], 0.3)),
}
print("before tsv", out["tsv"], "ta", out["ta0.3"], flush=True)
for rho in rhos:
    projected = []
    for (_, e), ev in zip(experts, eig):
        state = dict(e.encoder)
        for name, (evals, evecs) in ev.items():
            evals, evecs = evals.flip(0), evecs.flip(1)
            k = int((evals.cumsum(0) / evals.sum() < rho).sum()) + 1
            P = (evecs[:, :k] @ evecs[:, :k].T).float()
            W0, W = base[name].float(), e.encoder[name].float()
            state[name] = (W0 + ((W - W0).reshape(W.shape[0], -1) @ P).reshape(W.shape)).to(W.dtype)
        projected.append(state)
    alone = [measure(s) for s in projected]  # each projected expert alone
    r = {
        "experts_alone": [(a["acc_tasks"][i], a["asr"]) for i, a in enumerate(alone)],
        "tsv": measure(tsv_merging(base, projected, 1.25)),
        "ta0.3": measure(task_arithmetic(base, projected, 0.3)),
    }
    out[str(rho)] = r
    print(rho, json.dumps(r), flush=True)
json.dump(out, open(f"docs/merge/dev-v6/first_look/expert_{pool}.json", "w"), indent=1)
