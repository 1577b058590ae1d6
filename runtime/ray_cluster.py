"""Which Ray cluster an `item ... --engine ray` command runs on (the `ray` extra).

None: a new cluster on this machine for this command only, every port on loopback, stopped when
the command ends. "auto": the cluster `ray start` runs on this machine. HOST:PORT: that cluster's
head (GCS address). Nothing here imports ray until `connect`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace

# Ray's single-machine mode: the node's address is 127.0.0.1 and every Ray server listens there
# only (by default they listen on every interface, for the other nodes). Read when ray is imported.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass(frozen=True)
class Cluster:
    address: str | None = None
    started: bool = field(default=False, compare=False)  # by connect(): close() stops it

    def __post_init__(self):
        # made before the command imports ray (its modules do at import): a new local cluster's
        # processes, this one included, then take the loopback address
        if self.address is None and "ray" not in sys.modules:
            os.environ.setdefault(LOOPBACK_ENV, "0")

    def connect(self) -> Cluster:
        import ray

        if ray.is_initialized():  # already a driver (tests, a notebook): that cluster
            return self
        if self.address is None:
            ray.init(address="local", include_dashboard=False)
            return replace(self, started=True)
        ray.init(address=self.address)
        return self

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()
