"""Each pool's triggers on the clean expert of the target task: what the unbackdoored expert itself scores.

Run from the repository root: PYTHONPATH=. python docs/merge/heldout-v4/clean_expert_floor.py POOL ..."""

import json
import sys

import torch

from safemerge.data import get_task
from safemerge.evaluation import classifier_for, evaluate_backdoors
from safemerge.experts import MINI_MODEL, MINI_WEIGHTS, resolve_expert
from safemerge.io import read_expert
from safemerge.models import load_clip
from safemerge.pool import backdoors_of
from safemerge.protocol.pools import POOLS, backdoored_mini_pool, clean_twin

torch.set_num_threads(1)
clip = load_clip(MINI_MODEL, MINI_WEIGHTS)
out = {}
for name in sys.argv[1:]:
    refs = backdoored_mini_pool(name, POOLS)
    pool = [(r, read_expert(resolve_expert(r))) for r in refs]
    tasks = [get_task(e.task) for _, e in pool]
    backdoors, found = backdoors_of(pool, [t.name for t in tasks])
    clf = classifier_for(clip, tasks)
    rows = []
    for b, f in zip(backdoors, found):
        target = f["target_task"]
        twin = [clean_twin(r) for r, e in pool if e.task == target][0]
        expert = read_expert(resolve_expert(twin))
        _, per = evaluate_backdoors(clf, tasks, backdoors, tower_state=expert.encoder, image_size=clip.image_size)
        i = found.index(f)
        rows.append(
            {
                "expert": f["expert"],
                "target_task": target,
                "target_class": f["target_class"],
                "clean_expert": twin,
                "asr": per[i]["asr"],
                "target_rate": per[i]["target_rate"],
            }
        )
        print(
            name,
            f["expert"],
            target,
            f["target_class"],
            twin,
            f"asr {100 * per[i]['asr']:.1f} untrig {100 * per[i]['target_rate']:.1f}",
            flush=True,
        )
    out[name] = rows
json.dump(out, open("docs/merge/heldout-v4/clean_expert_floor.json", "w"), indent=1)
