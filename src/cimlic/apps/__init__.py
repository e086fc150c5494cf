"""The applications on top of the library: the command line and what it runs.

``cli`` (the only argument parser), ``runner`` (from a config to a run folder: train, eval), ``fewshot`` (the
few-shot protocol), ``predict``, ``bench``, ``demo`` and ``report``. The library (``cimlic.config``, ``data``,
``models``, ``losses``, ``metrics``, ``engine``, ...) never imports from here.
"""
