"""Checkpoints from elsewhere in and out: Hugging Face CLIP and task_vectors pickles -> safemerge
experts (and their open_clip base), safemerge experts and merges -> transformers.

One conversion step, before merging (``python -m safemerge.convert ...``): pools then name the
converted directories as they name any expert, so the rest of safemerge reads one format.
"""
