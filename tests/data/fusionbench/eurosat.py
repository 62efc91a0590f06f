# ruff: noqa
# Verbatim copy of https://github.com/tanganke/fusion_bench fusion_bench/tasks/clip_classification/eurosat.py
# at commit 54c9e8c9d9621620c720452cd8533332a32d3689. tests/test_fusionbench_pool.py compares safemerge/data/templates.py with it.
# Do not edit: re-copy.

classnames = [
    "annual crop land",
    "forest",
    "brushland or shrubland",
    "highway or road",
    "industrial buildings or commercial buildings",
    "pasture land",
    "permanent crop land",
    "residential buildings or homes or apartments",
    "river",
    "lake or sea",
]

templates = [
    lambda c: f"a centered satellite photo of {c}.",
    lambda c: f"a centered satellite photo of a {c}.",
    lambda c: f"a centered satellite photo of the {c}.",
]
