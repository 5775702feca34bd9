"""The application layer: the ``ipcv`` command line (:mod:`.cli`), the demo (:mod:`.demo`) and image
loading (:mod:`.images`).  It sits on top of the adapters; nothing else in the project imports it."""
