"""The training application: ``galorax train``, ``galorax compare`` and ``galorax memory``.

Built on the library (:mod:`galorax`), never the other way round. Modules, in the order a
run meets them: :mod:`~galorax.app.cli` (the command line), :mod:`~galorax.app.config` (the
run config), :mod:`~galorax.app.model` and :mod:`~galorax.app.data`, the optimizer factory
and the train-step builder, :mod:`~galorax.app.checkpoint`, :mod:`~galorax.app.distributed`
(processes and placement), the loop (:mod:`~galorax.app.train`), and the tools built on it:
:mod:`~galorax.app.compare` and :mod:`~galorax.app.planner`.
"""
