"""Using trained tasks: many task checkpoints on one frozen backbone (``MultiTaskClassifier``), image decoding
shared by ``vpt-predict`` and ``vpt-serve``, and the LitServe API (imported from ``.server``, needs litserve)."""

from ..renamed import renamed_names
from .multitask import MultiTaskClassifier, ServedTask, TaskClassifier

# TaskInfo, this class's old name, is vpt_lightning.data.TaskInfo's (a benchmark task's facts) too
__getattr__ = renamed_names(__name__, {"TaskInfo": ServedTask})

__all__ = ["MultiTaskClassifier", "ServedTask", "TaskClassifier"]
