"""The ``nso-jax`` application: the main job and its command line.

Built on the public API (:mod:`nso_jax`, :mod:`nso_jax.hessian`,
:mod:`nso_jax.training`); needs the ``cli`` extra. Modules: :mod:`.cli` (the
command line), :mod:`.job` (settings, model, optimizers, training and
curvature), :mod:`.data` (data sets) and :mod:`.report` (progress, tables,
JSON, plots).
"""
