"""Using trained tasks: many tasks on one frozen backbone (``TaskStore``: task folders loaded on demand;
``MultiTaskClassifier``: tasks given in memory), image decoding shared by ``vpt-predict`` and ``vpt-serve``, and the
LitServe API (imported from ``.server``, needs litserve)."""

from ..renamed import renamed_names
from .multitask import MultiTaskClassifier, ServedTask, TaskClassifier
from .task_store import TaskStore

# TaskInfo, this class's old name, is vpt_lightning.data.TaskInfo's (a benchmark task's facts) too
__getattr__ = renamed_names(__name__, {"TaskInfo": ServedTask})

__all__ = ["MultiTaskClassifier", "ServedTask", "TaskClassifier", "TaskStore"]
