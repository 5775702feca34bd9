"""ipcv_adapters: all model knowledge (which modules are blocks / attention / FFN, segments,
side inputs, exportable inputs).  ``ipcv_core`` and ``ipcv_compile`` never name a model."""
