# Diagnostic only (not part of safemerge): run trainer.py with every zero-shot head multiplied
# by HEAD_SCALE/26.5 (the tiny CLIP's logit scale is 26.5; real CLIP's is 100).
import os, sys
sys.path.insert(0, "/work/main")
import safemerge.evaluation as ev
import safemerge.modules.merge as mm
factor = float(os.environ["HEAD_SCALE"]) / 26.5053
orig = ev.classifier_for
def patched(clip, tasks):
    c = orig(clip, tasks)
    for t in c.tasks:
        getattr(c, c._head_name(t)).mul_(factor)
    return c
mm.classifier_for = patched
from safemerge.cli import main
sys.argv[0] = "trainer.py"
main()
