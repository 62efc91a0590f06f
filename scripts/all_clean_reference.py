"""``python scripts/all_clean_reference.py --help``: a thin entry point over :func:`safemerge.protocol.reference.main`
(the usage and the code are there; ``python -m safemerge.protocol.reference`` is the same command)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's package, without installing it

from safemerge.protocol.reference import main  # noqa: E402

if __name__ == "__main__":
    main()
