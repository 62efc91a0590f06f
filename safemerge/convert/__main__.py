"""``python -m safemerge.convert {hf-base,hf-expert,task-vectors,to-hf}``: one step per format.

Every bad input is one ``error: ...`` line on stderr and exit status 2; nothing is written
(each output is built beside its target and renamed into place only when complete).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from safemerge.errors import SafemergeError


def _run(args) -> Path:
    out = Path(args.out)
    if args.command == "hf-base":
        from safemerge.convert.hf import convert_base

        return convert_base(args.src, out)
    if args.command == "hf-expert":
        from safemerge.convert.hf import convert_expert

        return convert_expert(args.src, out, Path(args.base), args.task)
    if args.command == "task-vectors":
        from safemerge.convert.task_vectors import convert_task_vectors

        return convert_task_vectors(
            Path(args.src), out, args.task, args.model, args.pretrained, Path(args.head) if args.head else None
        )
    from safemerge.convert.export import export

    return export(Path(args.src), out, full=args.full)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m safemerge.convert", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    base = sub.add_parser("hf-base", help="a transformers CLIPModel -> a local-dir: open_clip model")
    expert = sub.add_parser("hf-expert", help="a transformers CLIPVisionModel -> a safemerge expert against --base")
    vectors = sub.add_parser("task-vectors", help="a task_vectors zeroshot.pt/finetuned.pt -> a safemerge expert")
    export = sub.add_parser(
        "to-hf", help="an expert or merged directory -> a transformers CLIPVisionModel (--full: CLIPModel)"
    )
    for command in (base, expert, vectors):
        command.add_argument(
            "src", metavar="SRC", help="a directory or file, or a hub id in the local Hugging Face cache"
        )
        command.add_argument("out", metavar="OUT")
    expert.add_argument("--base", required=True, help="the OUT of hf-base for the model the expert was fine-tuned from")
    for command in (expert, vectors):
        command.add_argument("--task", required=True, help="the safemerge task the expert solves")
    vectors.add_argument("--model", required=True, help="the open_clip architecture (e.g. ViT-B-32-quickgelu)")
    vectors.add_argument("--pretrained", required=True, help="the base's open_clip tag or weights file (e.g. openai)")
    vectors.add_argument("--head", help="the task's head_<task>.pt, used as its head in merges and evaluation")
    export.add_argument("src", metavar="EXPERT_OR_MERGED_DIR")
    export.add_argument("out", metavar="OUT")
    export.add_argument(
        "--full", action="store_true", help="write a CLIPModel with the base's text tower and projections"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    start = time.perf_counter()
    try:
        out = _run(args)
    except SafemergeError as err:
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    print(f"{args.command}: wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
