"""GPU benchmarks (``python -m bench.run``, ``bench.journey``, ``bench.multigpu``, ...).

``bench`` sits on top of the layers: it may import every package, and a command line
(train.py, infer.py, score.py) only through its public entry points ``main`` and
``build_parser``, never its internals (``tests/test_layers.py`` checks this).
"""
