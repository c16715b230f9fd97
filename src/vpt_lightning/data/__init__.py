"""DataModules, transforms, the benchmark registry and dataset tools."""

from .base import ImageClassificationDataModule
from .datasets import DataError, ImageListDataset
from .fgvc import FGVCDataModule, make_train_val_split
from .folder import FolderDataModule
from .registry import TaskInfo, fgvc_tasks, get_task, vtab_tasks
from .synthetic import SyntheticDataModule
from .transforms import build_transform, resolve_normalization
from .vtab import VTABDataModule

__all__ = [
    "DataError",
    "FGVCDataModule",
    "FolderDataModule",
    "ImageClassificationDataModule",
    "ImageListDataset",
    "SyntheticDataModule",
    "TaskInfo",
    "VTABDataModule",
    "build_transform",
    "fgvc_tasks",
    "get_task",
    "make_train_val_split",
    "resolve_normalization",
    "vtab_tasks",
]
