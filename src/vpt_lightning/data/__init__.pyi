# The data package's names, imported on first use: lazy_loader reads this stub ("X as X" marks a re-export), so that
# importing one light module of the package (transforms, the benchmark registry) does not import Lightning.
from .base import ImageClassificationDataModule as ImageClassificationDataModule
from .datasets import DataError as DataError
from .datasets import ImageListDataset as ImageListDataset
from .fgvc import FGVCDataModule as FGVCDataModule
from .fgvc import make_train_val_split as make_train_val_split
from .folder import FolderDataModule as FolderDataModule
from .registry import TaskInfo as TaskInfo
from .registry import fgvc_tasks as fgvc_tasks
from .registry import get_task as get_task
from .registry import vtab_tasks as vtab_tasks
from .synthetic import SyntheticDataModule as SyntheticDataModule
from .transforms import build_transform as build_transform
from .transforms import resolve_normalization as resolve_normalization
from .vtab import VTABDataModule as VTABDataModule
