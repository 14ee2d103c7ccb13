"""The torch.compile backend: entry (`entry.py`), capture and frozen weights, the pipeline, lowering, reports."""
