"""Run from the repository root with PYTHONPATH=. (a first look, before safemerge/merging/subspace.py existed).
Feasibility: project a merged update onto the principal subspace of clean input activations,
per linear layer; ACC/ASR before and after. Usage: merged_moments.py POOL MERGE [rho...]"""

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
pool, merge = sys.argv[1], sys.argv[2]
rhos = [float(r) for r in sys.argv[3:]] or [0.99]
refs = yaml.safe_load(open(f"configs/pools/{pool}.yaml"))["model"]["init_args"]["experts"]
clip = load_clip(MINI_MODEL, MINI_WEIGHTS)
base = {k: v.detach().clone() for k, v in clip.visual.state_dict().items()}
experts = [(r, read_expert(resolve_expert(r))) for r in refs]
tasks = [get_task(e.task) for _, e in experts]
backdoors, infos = backdoors_of(experts, [t.name for t in tasks])
clf = classifier_for(clip, tasks)
if merge == "tsv":
    merged = tsv_merging(base, [e.encoder for _, e in experts], 1.25)
elif merge.startswith("ta"):
    merged = task_arithmetic(base, [e.encoder for _, e in experts], float(merge[2:]))
else:  # a merged/ directory
    merged = read_expert(merge).encoder


def measure(state):
    per_task, per_bd = evaluate_backdoors(clf, tasks, backdoors, tower_state=state, image_size=clip.image_size)
    return {
        "acc": 100 * mean_known([t["accuracy"] for t in per_task.values()]),
        "asr": [round(100 * b["asr"], 1) for b in per_bd],
        "acc_tasks": [round(100 * t["accuracy"], 1) for t in per_task.values()],
    }


# clean input covariances on the merged model, adaptation (val) images of every task
clf.tower.load_state_dict(merged)
v = clf.tower
cov, count = {}, {}


def add(name, a):
    a = a.reshape(-1, a.shape[-1]).double()
    cov[name] = cov.get(name, 0) + a.T @ a
    count[name] = count.get(name, 0) + len(a)


hooks = []


def pre(name):
    def f(mod, args, kwargs=None):
        add(name, args[0].detach())

    return f


hooks.append(
    v.conv1.register_forward_pre_hook(
        lambda m, a: add("conv1.weight", F.unfold(a[0].detach(), 8, stride=8).transpose(1, 2))
    )
)
for i, blk in enumerate(v.transformer.resblocks):
    p = f"transformer.resblocks.{i}."
    hooks.append(blk.attn.register_forward_pre_hook(pre(p + "attn.in_proj_weight")))
    hooks.append(blk.mlp.c_fc.register_forward_pre_hook(pre(p + "mlp.c_fc.weight")))
    hooks.append(blk.mlp.c_proj.register_forward_pre_hook(pre(p + "mlp.c_proj.weight")))
with torch.no_grad():
    for t in tasks:
        ds = t.build("val", root=None, image_size=clip.image_size, download=False, seed=0)
        for images, _ in DataLoader(ds, batch_size=256):
            clf(images, t.name)
for h in hooks:
    h.remove()
out = {"pool": pool, "merge": merge, "before": measure(merged), "backdoors": infos}
print("before", out["before"], flush=True)
for rho in rhos:
    state = dict(merged)
    kept = {}
    for name, c in cov.items():
        c = c / count[name]
        evals, evecs = torch.linalg.eigh(c)
        evals, evecs = evals.flip(0), evecs.flip(1)
        k = int((evals.cumsum(0) / evals.sum() < rho).sum()) + 1
        P = (evecs[:, :k] @ evecs[:, :k].T).float()
        kept[name] = k
        W0, W = base[name].float(), merged[name].float()
        d = (W - W0).reshape(W.shape[0], -1)
        state[name] = (W0 + (d @ P).reshape(W.shape)).to(merged[name].dtype)
    r = measure(state)
    r["kept"] = kept
    out[str(rho)] = r
    print(rho, {k: r[k] for k in ("acc", "asr", "acc_tasks")}, "kept", list(kept.values()), flush=True)
json.dump(out, open(f"docs/merge/dev-v6/first_look/{pool}_{merge.replace('/', '_')}.json", "w"), indent=1)
