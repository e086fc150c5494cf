"""The Digits world, the embedded default of ``cimlic demo`` (DESIGN.md): everything it is made of, in one place.

``world`` builds the task and the pre-training corpus from scikit-learn's handwritten digits, ``pretrain``
pre-trains the tiny CLIP on that corpus (cached), and ``settings`` holds the demo's per-method settings.
"""
