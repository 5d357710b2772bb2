"""Fault injection for the reliability tests.

With ``ISIF_FAULT=SITE:N`` in the environment, the N-th time the process
reaches ``fault_point(SITE)`` it kills itself with SIGKILL: no handler,
no cleanup, as a machine failure or ``kill -9`` would. Without the variable
a fault point costs one dictionary lookup.

Sites: ``step`` (after an optimiser step), ``checkpoint-write`` (a checkpoint
fully written to its temporary file, not yet renamed), ``eval`` (between the
bank and the query features of a kNN evaluation), ``metrics-write`` (the new
metrics.jsonl written to its temporary file, not yet renamed), ``epoch-end``
(checkpoint saved, metrics not yet written), ``step-checkpoint`` (a ``--checkpoint-every`` checkpoint saved
inside an epoch).
"""

from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}


def fault_point(site: str) -> None:
    spec = os.environ.get("ISIF_FAULT")
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name != site:
        return
    _seen[site] = _seen.get(site, 0) + 1
    if _seen[site] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
