"""The ``nso-jax`` application: the main job, the experiments, the command line.

Built on the public API (:mod:`nso_jax`, :mod:`nso_jax.hessian`,
:mod:`nso_jax.training`); needs the ``cli`` extra. Modules: :mod:`.cli` (the
command line), :mod:`.settings` (every command's settings, their limits and
flags), :mod:`.job` (``nso-jax train``), :mod:`.experiments`
(``nso-jax experiment NAME``: the paper's claims tested), :mod:`.data`
(data sets and their variants), :mod:`.optimizers` (the optimizers and
matched-compute methods), :mod:`.classifier` (the MLP and its training
loop), :mod:`.measures` (accuracy, loss and curvature measures),
:mod:`.records` (typed results), :mod:`.output` (progress, tables, JSON,
plots, files) and :mod:`.interrupts` (Ctrl-C).
"""
