"""Test configuration: no network, no W&B syncing, caches under a temporary folder."""

import os
import sys
import tempfile
from pathlib import Path

# Set before anything imports huggingface_hub or wandb (also inherited by CLI subprocesses).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("SAFEMERGE_CACHE", tempfile.mkdtemp(prefix="safemerge-test-cache-"))

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
