"""The offline VTAB-1k preparation behind ``vpt-prepare vtab``: source readers, TFDS's example order, VTAB's
slices, the authors' split file, and the builder of the task folders :class:`~vpt_lightning.data.VTABDataModule`
reads.

Kept apart from the DataModules, which use only its source catalogue (:mod:`.sources`, named in the hint for a
missing VTAB-1k folder). This ``__init__`` imports nothing, so reading the catalogue does not import the builder
(:mod:`.prepare`, which imports ``data/vtab.py`` for the list-file names).
"""
