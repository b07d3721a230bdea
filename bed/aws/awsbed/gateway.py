"""The WSGI app the bed serves: the control API, and every AWS call on its way to moto.

For an AWS call, in order:

1. the body is read (and put back for moto) to learn the action and its parameters;
2. an armed error rule may answer instead (Throttling / InternalFailure): moto never sees the call;
3. DescribeScalingActivities (Auto Scaling, Query protocol) is answered from the bed's own record;
4. anything else goes to moto's own app, under the world lock; a call that may change something is
   observed, so the launches and terminations it causes become scaling activities;
5. the call is logged with the HTTP status it got.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from http import HTTPStatus
from typing import Any

from .activities import ActivityLog, describe_scaling_activities
from .calls import CallLog
from .control import PREFIX, ControlApi
from .faults import ErrorInjector
from .protocol import AwsRequest, ErrorReply, new_request_id, parse_aws_request, read_body, validation_error
from .world import MotoWorld, Trigger

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

ACTIVITY_ID = re.compile(rb"<ActivityId>([^<]+)</ActivityId>")


GROUP = "AutoScalingGroup"


def status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


class Gateway:
    def __init__(
        self,
        moto_app: WsgiApp,
        control: ControlApi,
        world: MotoWorld,
        calls: CallLog,
        errors: ErrorInjector,
        activities: ActivityLog,
    ) -> None:
        self.moto_app = moto_app
        self.control = control
        self.world = world
        self.calls = calls
        self.errors = errors
        self.activities = activities

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "").startswith(PREFIX):
            return self.control(environ, start_response)
        body = read_body(environ)
        request = parse_aws_request(environ, body)
        if not request.is_aws_call:  # moto's own /moto-api and the like: passed through, not logged
            line, headers, chunks = self._call_moto(environ, request, observe=False)
            start_response(line, headers)
            return chunks
        return self._serve_aws_call(environ, start_response, request)

    def _serve_aws_call(
        self, environ: dict[str, Any], start_response: Callable[..., Any], request: AwsRequest
    ) -> Iterable[bytes]:
        request_id = new_request_id()
        injected = self.errors.pick(request.action)
        if injected is not None:
            status, headers, payload = injected.render(request, request_id)
            self.calls.record(request, status, injected_error=injected.code)
            start_response(status_line(status), headers)
            return [payload]

        if request.protocol == "query" and request.action == "DescribeScalingActivities":
            answer = describe_scaling_activities(self.activities, request, request_id)
            if isinstance(answer, ErrorReply):
                answer = answer.render(request, request_id)
            status, headers, payload = answer
            self.calls.record(request, status)
            start_response(status_line(status), headers)
            return [payload]

        refused = self._refuse_desired_outside_bounds(request)
        if refused is not None:
            status, headers, payload = refused.render(request, request_id)
            self.calls.record(request, status)
            start_response(status_line(status), headers)
            return [payload]

        line, headers, chunks = self._call_moto(environ, request, observe=not request.is_read_only)
        self.calls.record(request, int(line.split(" ", 1)[0]))
        start_response(line, headers)
        return chunks

    def _call_moto(
        self, environ: dict[str, Any], request: AwsRequest, observe: bool
    ) -> tuple[str, list[tuple[str, str]], list[bytes]]:
        """Run moto's app to completion under the world lock; (status line, headers, body chunks).

        With ``observe``, the ASG launches and terminations the call causes become activities.
        """
        captured: dict[str, Any] = {}
        written: list[bytes] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
            captured["status"], captured["headers"] = status, headers
            return written.append

        trigger = Trigger(request.label()) if observe else None
        with self.world.lock, self.world.observe(trigger) if trigger else nullcontext():
            result = self.moto_app(environ, capture)
            try:
                chunks = written + list(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
            if request.action == "UpdateAutoScalingGroup" and captured["status"].startswith("200"):
                self._keep_capacity_rebalance(request)
            if trigger is not None and request.action == "TerminateInstanceInAutoScalingGroup":
                self._keep_promised_activity_id(trigger, request, captured["status"], b"".join(chunks))
        return captured["status"], captured["headers"], chunks

    def _refuse_desired_outside_bounds(self, request: AwsRequest) -> ErrorReply | None:
        """AWS refuses a SetDesiredCapacity outside [MinSize, MaxSize]; moto 5.2.5 takes any value."""
        if request.action != "SetDesiredCapacity" or request.asg_name is None or request.desired_capacity is None:
            return None
        with self.world.lock:
            group = self.world.find_group(request.asg_name)
            if group is None:
                return None
            desired, low, high = request.desired_capacity, group.min_size, group.max_size
        if desired > high:
            return validation_error(
                f"New SetDesiredCapacity value {desired} is above max value {high} for the {GROUP}."
            )
        if desired < low:
            return validation_error(f"New SetDesiredCapacity value {desired} is below min value {low} for the {GROUP}.")
        return None

    def _keep_capacity_rebalance(self, request: AwsRequest) -> None:
        """moto 5.2.5 takes CapacityRebalance only at creation; AWS also changes it on update."""
        value = request.params.get("CapacityRebalance")
        group = self.world.find_group(request.asg_name) if request.asg_name else None
        if value is not None and group is not None:
            group.capacity_rebalance = value.lower() == "true"

    @staticmethod
    def _keep_promised_activity_id(trigger: Trigger, request: AwsRequest, status: str, body: bytes) -> None:
        """moto answers TerminateInstanceInAutoScalingGroup with an ActivityId; record under that id."""
        match = ACTIVITY_ID.search(body)
        instance_id = request.params.get("InstanceId")
        if status.startswith("200") and match and instance_id:
            trigger.promised_activity_ids[instance_id] = match.group(1).decode()
