"""``--workers N``: the supervisor (``supervisor.py``), model control across the workers
(``control.py``), their merged metrics (``metrics.py``) and the per-worker answer marker
(``scope.py``). docs/deploy.md says what is per worker and what is shared."""

from infergate.workers.control import WorkerControl, WorkerRole
from infergate.workers.supervisor import supervise

__all__ = ["WorkerControl", "WorkerRole", "supervise"]
