"""Using trained tasks: many task checkpoints on one frozen backbone (``MultiTaskClassifier``), image decoding
shared by ``vpt-predict`` and ``vpt-serve``, and the LitServe API (imported from ``.server``, needs litserve)."""

from .multitask import MultiTaskClassifier, TaskClassifier, TaskInfo

__all__ = ["MultiTaskClassifier", "TaskClassifier", "TaskInfo"]
