"""Which task vector costs letters its accuracy in a merge: the clean letters expert's task
vector added to one other clean expert's (task arithmetic, λ 1 for letters and ``λ`` for the
other), letters test accuracy per partner and per λ; and the same for fashion, the other weak task.

Run from the repository root: PYTHONPATH=. python docs/merge/dev-v5/letters_interference.py"""

import json

import torch

from safemerge.data import get_task
from safemerge.evaluation import classifier_for, evaluate
from safemerge.experts import MINI_MODEL, MINI_WEIGHTS, resolve_expert
from safemerge.io import read_expert
from safemerge.merging.arithmetic import task_arithmetic
from safemerge.models import load_clip

torch.set_num_threads(1)
TASKS = ["mini_shapes", "mini_digits", "mini_fashion", "mini_textures", "mini_letters", "mini_terrain"]
clip = load_clip(MINI_MODEL, MINI_WEIGHTS)
base = {k: v.detach().clone() for k, v in clip.visual.state_dict().items()}
experts = {t: read_expert(resolve_expert(f"mini:{t}")).encoder for t in TASKS}
out = {}
for weak in ("mini_letters", "mini_fashion"):
    task = get_task(weak)
    clf = classifier_for(clip, [task])

    def accuracy(state):
        return evaluate(clf, [task], tower_state=state, image_size=clip.image_size)[weak]["accuracy"]

    rows = {"expert": accuracy(experts[weak]), "zero-shot": accuracy(base)}
    for other in TASKS:
        if other != weak:
            for lam in (0.3, 1.0):
                rows[f"{other} λ {lam}"] = accuracy(task_arithmetic(base, [experts[weak], experts[other]], [1.0, lam]))
    out[weak] = rows
    for key, value in rows.items():
        print(weak, key, f"{100 * value:.1f}", flush=True)
json.dump(out, open("docs/merge/dev-v5/letters_interference.json", "w"), indent=1)
