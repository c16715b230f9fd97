"""DataModules, transforms, the benchmark registry and dataset tools."""

import lazy_loader

# the names of __init__.pyi, imported when first used: `vpt_lightning.data.transforms` alone (what serving needs)
# does not import Lightning
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
