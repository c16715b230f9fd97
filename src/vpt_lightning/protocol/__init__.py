"""The paper's protocol and what reads its results: sweep, select and final runs per task
(:mod:`.task_protocol`), the Optuna search (:mod:`.search`), the paper's numbers (:mod:`.paper`), result tables
(:mod:`.report`) and figures (:mod:`.viz`).

``vpt_lightning.protocol`` was one module; its names are still served from here for one release, with a
``DeprecationWarning``: import them from :mod:`vpt_lightning.protocol.task_protocol`."""

from ..renamed import moved_names

__getattr__ = moved_names(__name__, f"{__name__}.task_protocol")
