"""The ``nso-jax`` application: the main job, the experiments, the command line.

Built on the public API (:mod:`nso_jax`, :mod:`nso_jax.hessian`,
:mod:`nso_jax.training`); needs the ``cli`` extra. Modules: :mod:`.cli` (the
command line), :mod:`.job` (settings, model, optimizers, training and
curvature), :mod:`.data` (data sets), :mod:`.report` (progress, tables,
JSON, plots) and :mod:`.experiments` (``nso-jax experiment NAME``: the
paper's claims tested).
"""
