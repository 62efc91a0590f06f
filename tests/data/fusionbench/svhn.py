# ruff: noqa
# Verbatim copy of https://github.com/tanganke/fusion_bench fusion_bench/tasks/clip_classification/svhn.py
# at commit 54c9e8c9d9621620c720452cd8533332a32d3689. tests/test_fusionbench_pool.py compares safemerge/data/templates.py with it.
# Do not edit: re-copy.

classnames = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]

templates = [
    lambda c: f'a photo of the number: "{c}".',
]
