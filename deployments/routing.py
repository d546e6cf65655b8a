"""Ray Serve request router that sends a call to the replica named in its `replica_id` kwarg.

pdray's router picks instances from Redis load records; this makes the deployment handle deliver
the call to exactly that replica. Calls without `replica_id` go to any replica.

A named replica that Serve no longer lists (it died or was replaced) would leave the call waiting
forever, so it goes to any live replica instead, which refuses it at once (PDReplica checks
`replica_id`) and the caller fails over. A replica this handle has never listed may be one that
is starting (its Redis record can come before Serve lists it): the call waits up to
`UNLISTED_GRACE_S` for it to appear.
"""

from __future__ import annotations

import time

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

UNLISTED_GRACE_S = 5.0


class ReplicaIdRouter(RequestRouter):
    def initialize_state(self, **kwargs) -> None:
        self._listed: set[str] = set()  # replica ids this handle has seen Serve list

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        target = None
        if pending_request is not None:
            target = pending_request.kwargs.get("replica_id")
        if target is None:
            return [candidate_replicas]
        self._listed.update(r.replica_id.unique_id for r in candidate_replicas)
        chosen = [r for r in candidate_replicas if r.replica_id.unique_id == target]
        if chosen:
            return [chosen]
        waited_s = time.time() - pending_request.created_at
        if target in self._listed or waited_s > UNLISTED_GRACE_S:
            return [candidate_replicas]  # gone: any replica refuses the call
        return []
