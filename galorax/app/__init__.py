"""The training application: ``galorax train``, ``galorax compare`` and ``galorax memory``.

Built on the library (:mod:`galorax`), never the other way round; no module here imports one
that imports it back. Modules, in the order a run meets them:

* :mod:`~galorax.app.cli` (the command line: it lists its subcommands itself) and
  :mod:`~galorax.app.flags` (the flags ``train`` and ``compare`` share);
* :mod:`~galorax.app.config`: :class:`~galorax.app.config.TrainConfig` (as given),
  :class:`~galorax.app.config.RunConfig` (resolved, every field concrete), the optimizer
  and dtype vocabularies, ``UsageError``;
* :mod:`~galorax.app.model` and :mod:`~galorax.app.data`;
* :mod:`~galorax.app.optimizers` (the one optimizer factory, GaLore's dimension numbers,
  rank clipping, the lr schedule) and :mod:`~galorax.app.step` (the one train step, its
  compile and XLA memory record);
* :mod:`~galorax.app.distributed` (processes and where arrays live on a mesh),
  :mod:`~galorax.app.checkpoint` (its state as orbax items: :mod:`~galorax.app.flat_state`)
  and :mod:`~galorax.app.rundir` (the output directory,
  an ``--overwrite``n run kept aside until the new one is under way, atomic writes, the
  metrics log), :mod:`~galorax.app.interrupt` (Ctrl-C on step boundaries);
* :mod:`~galorax.app.build` (a run's first phases: open the run, build, restore or init),
  :mod:`~galorax.app.train` (compile, the summary; :func:`~galorax.app.train.train` runs
  every phase), :mod:`~galorax.app.loop` (the loop), :mod:`~galorax.app.summary`
  (``summary.json``) and :mod:`~galorax.app.report` (the summary table, loss curves);
* the tools built on it: :mod:`~galorax.app.compare` (its report:
  :mod:`~galorax.app.compare_report`) and :mod:`~galorax.app.memory` (``galorax memory``;
  its planner: :mod:`~galorax.app.planner`).
"""
