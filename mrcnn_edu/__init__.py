"""mrcnn_edu — Mask R-CNN, stage by stage.

A small, readable PyTorch implementation of Mask R-CNN whose every stage is checked numerically
against torchvision, and the package behind the course notebooks in ``notebooks/``.
"""

__version__ = "0.1.0"



def __getattr__(name: str):
    # `mrcnn_edu.describe` without importing torch at package import (keeps `mrcnn-edu --help` fast)
    if name == "describe":
        from mrcnn_edu.utils import describe

        return describe
    raise AttributeError(f"module 'mrcnn_edu' has no attribute {name!r}")
