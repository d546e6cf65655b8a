"""Ray Serve request router that sends a call to the replica named in its `replica_id` kwarg.

pdray's router picks instances from Redis load records; this makes the deployment handle deliver
the call to exactly that replica. Calls without `replica_id` go to any replica.
"""

from __future__ import annotations

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


class ReplicaIdRouter(RequestRouter):
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
        return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]
