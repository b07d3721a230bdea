"""Auto Scaling activities: the record the bed keeps, and the DescribeScalingActivities answer.

moto 5.2.5 answers DescribeScalingActivities with an empty list, whatever happened, so the bed keeps
its own record (written by ``scaling.ScalingEngine`` and the control API) and answers that call itself.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .protocol import (
    AUTOSCALING_XMLNS,
    AwsRequest,
    ErrorReply,
    iso_timestamp,
    parse_int,
    response_headers,
    validation_error,
    xml_element,
)

# Every StatusCode the Auto Scaling API defines for an activity.
STATUS_CODES = frozenset(
    {
        "PendingSpotBidPlacement",
        "WaitingForSpotInstanceRequestId",
        "WaitingForSpotInstanceId",
        "WaitingForInstanceId",
        "PreInService",
        "InProgress",
        "WaitingForELBConnectionDraining",
        "MidLifecycleAction",
        "WaitingForInstanceWarmup",
        "Successful",
        "Failed",
        "Cancelled",
        "WaitingForConnectionDraining",
        "WaitingForInPlaceUpdateToStart",
        "WaitingForInPlaceUpdateToFinalize",
        "InPlaceUpdateInProgress",
    }
)

TERMINAL_STATUS_CODES = frozenset({"Successful", "Failed", "Cancelled"})

MAX_RECORDS = 100


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Activity:
    """One scaling activity, in the shape of the Auto Scaling API's ``Activity``."""

    asg_name: str
    region: str
    description: str
    cause: str
    status_code: str
    status_message: str | None = None
    details: str = "{}"
    asg_arn: str | None = None
    progress: int | None = None
    activity_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    start_time: datetime = field(default_factory=utc_now)
    end_time: datetime | None = None
    seq: int = 0

    def __post_init__(self) -> None:
        if self.status_code not in STATUS_CODES:
            raise ValueError(f"unknown activity status {self.status_code!r}")
        if self.status_code in TERMINAL_STATUS_CODES:
            self.end_time = self.end_time or self.start_time
        if self.progress is None:
            self.progress = 100 if self.status_code in TERMINAL_STATUS_CODES else 0

    def set_status(self, status_code: str, status_message: str | None, progress: int | None) -> None:
        if status_code not in STATUS_CODES:
            raise ValueError(f"unknown activity status {status_code!r}")
        self.status_code = status_code
        if status_message is not None:
            self.status_message = status_message
        terminal = status_code in TERMINAL_STATUS_CODES
        self.end_time = utc_now() if terminal else None
        self.progress = progress if progress is not None else (100 if terminal else self.progress)

    def to_json(self) -> dict[str, Any]:
        return {
            "activity_id": self.activity_id,
            "asg": self.asg_name,
            "region": self.region,
            "description": self.description,
            "cause": self.cause,
            "start_time": iso_timestamp(self.start_time),
            "end_time": iso_timestamp(self.end_time) if self.end_time else None,
            "status": self.status_code,
            "status_message": self.status_message,
            "progress": self.progress,
            "details": self.details,
        }

    def to_xml_member(self) -> str:
        return f"<member>{self.to_xml_fields()}</member>"

    def to_xml_fields(self) -> str:
        return (
            xml_element("ActivityId", self.activity_id)
            + xml_element("AutoScalingGroupName", self.asg_name)
            + xml_element("AutoScalingGroupARN", self.asg_arn)
            + xml_element("Description", self.description)
            + xml_element("Cause", self.cause)
            + xml_element("StartTime", iso_timestamp(self.start_time))
            + xml_element("EndTime", iso_timestamp(self.end_time) if self.end_time else None)
            + xml_element("StatusCode", self.status_code)
            + xml_element("StatusMessage", self.status_message)
            + xml_element("Progress", self.progress)
            + xml_element("Details", self.details)
        )


class ActivityLog:
    """Thread-safe store of activities, answered newest first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, Activity] = {}
        self._seq = itertools.count(1)

    def add(self, activity: Activity) -> Activity:
        with self._lock:
            activity.seq = next(self._seq)
            self._by_id[activity.activity_id] = activity
            return activity

    def update(
        self,
        activity_id: str,
        status_code: str,
        status_message: str | None = None,
        progress: int | None = None,
    ) -> Activity:
        """Change an activity's status; KeyError if unknown, ValueError if the status is."""
        with self._lock:
            activity = self._by_id[activity_id]
            activity.set_status(status_code, status_message, progress)
            return activity

    def query(
        self,
        region: str | None = None,
        asg_name: str | None = None,
        activity_ids: list[str] | None = None,
    ) -> list[Activity]:
        """Matching activities, newest first (by start time, then by when they were recorded)."""
        with self._lock:
            found = [
                a
                for a in self._by_id.values()
                if (region is None or a.region == region)
                and (asg_name is None or a.asg_name == asg_name)
                and (not activity_ids or a.activity_id in activity_ids)
            ]
        return sorted(found, key=lambda a: (a.start_time, a.seq), reverse=True)

    def clear(self) -> None:
        with self._lock:
            self._by_id.clear()


def describe_scaling_activities(
    log: ActivityLog, request: AwsRequest, request_id: str
) -> tuple[int, list[tuple[str, str]], bytes] | ErrorReply:
    """Answer a Query-protocol DescribeScalingActivities call from ``log``.

    Honours AutoScalingGroupName, ActivityIds, MaxRecords (1-100, default 100) and NextToken (an
    offset into the newest-first list). Returns (status, headers, body), or the error to send.
    """
    max_records = parse_int(request.params.get("MaxRecords")) or MAX_RECORDS
    if not 1 <= max_records <= MAX_RECORDS:
        return validation_error("MaxRecords must be between 1 and 100")
    token = request.params.get("NextToken")
    offset = parse_int(token) if token else 0
    if offset is None or offset < 0:
        return ErrorReply(
            400, "InvalidNextToken", "The token is invalid.", True, "InvalidNextToken", "InvalidNextToken"
        )

    activities = log.query(
        region=request.region,
        asg_name=request.asg_name,
        activity_ids=request.list_param("ActivityIds"),
    )
    page = activities[offset : offset + max_records]
    next_offset = offset + len(page)
    next_token = str(next_offset) if next_offset < len(activities) else None

    body = (
        f'<DescribeScalingActivitiesResponse xmlns="{AUTOSCALING_XMLNS}">'
        "<DescribeScalingActivitiesResult>"
        f"<Activities>{''.join(a.to_xml_member() for a in page)}</Activities>"
        f"{xml_element('NextToken', next_token)}"
        "</DescribeScalingActivitiesResult>"
        f"<ResponseMetadata>{xml_element('RequestId', request_id)}</ResponseMetadata>"
        "</DescribeScalingActivitiesResponse>"
    ).encode()
    return 200, response_headers("text/xml", body, request_id), body
