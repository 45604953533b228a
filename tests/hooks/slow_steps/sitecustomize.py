"""Test hook, put on ``PYTHONPATH`` by ``kdb_util.slow_steps_env``: every training step of
``kdbench.train.fit`` in a Python process started with it (a ``kdbench run`` subprocess, its local or SLURM jobs)
sleeps ``KDBENCH_TEST_STEP_SLEEP_S`` seconds, so that a tiny run lasts long enough to be stopped, time-limited
or watched.

``fit`` reports each finished and timed step to its ``ProgressFile`` (``update(step=i + 1)``); the sleep follows
that report, so no number changes, not even the step time. Only ``kdbench.progress`` (torch-free) is imported.
"""

import os

_SLEEP_S = float(os.environ.get("KDBENCH_TEST_STEP_SLEEP_S") or 0)

if _SLEEP_S > 0:
    import time

    from kdbench.progress import ProgressFile

    _update = ProgressFile.update

    def _update_then_sleep(self, *, step=None, **kw):
        _update(self, step=step, **kw)
        if step:  # a finished step (step=0 starts an epoch)
            time.sleep(_SLEEP_S)

    ProgressFile.update = _update_then_sleep
