"""``import ipcv``: the public API of the ``ipcv`` distribution in one place.

    import ipcv

    tower = ipcv.rewrite(model.model.visual, retain=0.35)        # a drop-in IPCV vision tower
    model = ipcv.compress(model, vit_retain=0.35, llm="dart")    # + DART / FastV in the language model
    cfg = ipcv.IPCVConfig(retain=0.35, k=8)

The implementation lives in ``ipcv_core`` (math), ``ipcv_compile`` (the compiler) and
``ipcv_adapters`` (model knowledge, the ``ipcv`` command); this package only re-exports them.
"""

from ipcv_adapters import compress
from ipcv_compile import rewrite
from ipcv_core import IPCVConfig, __version__

__all__ = ["rewrite", "compress", "IPCVConfig", "__version__"]
