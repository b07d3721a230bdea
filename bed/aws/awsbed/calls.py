"""The call log: every AWS API call the bed answered, in arrival order."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from .protocol import AwsRequest, iso_timestamp


@dataclass(frozen=True)
class CallRecord:
    seq: int
    time: str
    service: str | None
    region: str | None
    action: str
    asg: str | None
    desired_capacity: int | None
    status: int
    # The error code the bed injected instead of calling moto, if it did.
    injected_error: str | None
    # Who called: "client" (an AWS SDK through the endpoint) or "neighbour" (the control API's
    # cluster-autoscaler-like actor).
    actor: str = "client"
    # The request's parameters (Action and Version left out).
    params: dict[str, str] = field(default_factory=dict)
    # AWS's error code and message when the call failed (injected or not).
    error: str | None = None
    error_message: str | None = None
    # The scaling activities the call produced, in order.
    activity_ids: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class CallLog:
    """Thread-safe, append-only list of calls; tests read it filtered and may clear it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[CallRecord] = []
        self._next_seq = 1

    def record(
        self,
        request: AwsRequest,
        status: int,
        injected_error: str | None = None,
        error: tuple[str, str] | None = None,
        activity_ids: list[str] | None = None,
        actor: str = "client",
    ) -> CallRecord:
        params = {k: v for k, v in request.params.items() if k not in ("Action", "Version")}
        with self._lock:
            record = CallRecord(
                seq=self._next_seq,
                time=iso_timestamp(datetime.now(timezone.utc)),
                service=request.service,
                region=request.region,
                action=request.label(),
                asg=request.asg_name,
                desired_capacity=request.desired_capacity,
                status=status,
                injected_error=injected_error,
                actor=actor,
                params=params,
                error=error[0] if error else None,
                error_message=error[1] if error else None,
                activity_ids=list(activity_ids or []),
            )
            self._next_seq += 1
            self._records.append(record)
            return record

    def query(
        self,
        action: str | None = None,
        asg: str | None = None,
        service: str | None = None,
        since: int | None = None,
        actor: str | None = None,
    ) -> list[CallRecord]:
        """Records matching every given filter; ``since`` keeps those with a larger ``seq``."""
        with self._lock:
            records = list(self._records)
        return [
            r
            for r in records
            if (action is None or r.action == action)
            and (asg is None or r.asg == asg)
            and (service is None or r.service == service)
            and (since is None or r.seq > since)
            and (actor is None or r.actor == actor)
        ]

    def clear(self) -> None:
        with self._lock:
            self._records.clear()
