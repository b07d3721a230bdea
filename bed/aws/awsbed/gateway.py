"""The WSGI app the bed serves: the control API, and every AWS call on its way to moto.

For an AWS call, in order:

1. the body is read (and put back for moto) to learn the action and its parameters;
2. an armed error rule, or an empty throttling token bucket, may answer instead (Throttling /
   InternalFailure): moto never sees the call;
3. the Auto Scaling calls whose AWS behaviour moto lacks are answered by the bed
   (``Gateway.answered_here``): DescribeScalingActivities from the bed's record; SetDesiredCapacity,
   TerminateInstanceInAutoScalingGroup, CompleteLifecycleAction, RecordLifecycleActionHeartbeat by
   the scaling engine, with AWS's refusals;
4. anything else goes to moto's own app, under the world lock (moto's ASG launches and terminations
   go through the scaling engine too);
5. the call is logged with its parameters, its answer and the activities it produced.
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
from .faults import ErrorInjector, Throttle
from .protocol import (
    AUTOSCALING_XMLNS,
    AwsRequest,
    ErrorReply,
    new_request_id,
    parse_aws_request,
    read_body,
    response_headers,
    validation_error,
    xml_element,
)
from .scaling import AwsRefusal, ScalingEngine
from .world import MotoWorld

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

ERROR_CODE = re.compile(rb"<Code>([^<]*)</Code>")
ERROR_MESSAGE = re.compile(rb"<Message>([^<]*)</Message>")


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
        throttle: Throttle | None = None,
    ) -> None:
        self.moto_app = moto_app
        self.control = control
        self.world = world
        self.calls = calls
        self.errors = errors
        self.activities = activities
        self.throttle = throttle if throttle is not None else Throttle()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "").startswith(PREFIX):
            return self.control(environ, start_response)
        body = read_body(environ)
        request = parse_aws_request(environ, body)
        if not request.is_aws_call:  # moto's own /moto-api and the like: passed through, not logged
            line, headers, chunks, _ = self._call_moto(environ, request, observe=False)
            start_response(line, headers)
            return chunks
        return self._serve_aws_call(environ, start_response, request)

    def _serve_aws_call(
        self, environ: dict[str, Any], start_response: Callable[..., Any], request: AwsRequest
    ) -> Iterable[bytes]:
        request_id = new_request_id()
        asgs = self._asgs_named(request)
        injected = self.errors.pick(request.action, asgs) or self.throttle.pick(request.action, asgs)
        if injected is not None:
            status, headers, payload = injected.render(request, request_id)
            self.calls.record(request, status, injected_error=injected.code, error=(injected.code, injected.message))
            start_response(status_line(status), headers)
            return [payload]

        if request.protocol == "query" and request.action in self.answered_here:
            status, headers, payload, activity_ids = self._answer_here(request, request_id)
            self.calls.record(request, status, error=error_of(status, payload), activity_ids=activity_ids)
            start_response(status_line(status), headers)
            return [payload]

        line, headers, chunks, activity_ids = self._call_moto(environ, request, observe=not request.is_read_only)
        status = int(line.split(" ", 1)[0])
        self.calls.record(request, status, error=error_of(status, b"".join(chunks)), activity_ids=activity_ids)
        start_response(line, headers)
        return chunks

    answered_here = frozenset(
        {
            "DescribeScalingActivities",
            "SetDesiredCapacity",
            "TerminateInstanceInAutoScalingGroup",
            "CompleteLifecycleAction",
            "RecordLifecycleActionHeartbeat",
        }
    )

    def _asgs_named(self, request: AwsRequest) -> frozenset[str]:
        """The ASGs a call is about: by name, or (TerminateInstanceInAutoScalingGroup) by instance."""
        names = set(request.list_param("AutoScalingGroupNames"))
        if request.asg_name:
            names.add(request.asg_name)
        instance_id = request.params.get("InstanceId")
        if instance_id and request.action == "TerminateInstanceInAutoScalingGroup":
            with self.world.lock:
                found = self.world.find_member(instance_id)
            if found is not None:
                names.add(found[0].name)
        return frozenset(names)

    def _answer_here(self, request: AwsRequest, request_id: str) -> tuple[int, list[tuple[str, str]], bytes, list[str]]:
        """Auto Scaling calls the bed answers itself: (status, headers, body, activity ids)."""
        if request.action == "DescribeScalingActivities":
            answer = describe_scaling_activities(self.activities, request, request_id)
            if isinstance(answer, ErrorReply):
                answer = answer.render(request, request_id)
            return (*answer, [])
        engine = self.world.engine
        assert engine is not None
        with self.world.lock, engine.request(request.label()) as context:
            try:
                body = self._act(engine, request)
            except AwsRefusal as refusal:
                status, headers, payload = validation_error(str(refusal)).render(request, request_id)
                return status, headers, payload, context.activity_ids
            except ValueError as bad:
                status, headers, payload = validation_error(str(bad)).render(request, request_id)
                return status, headers, payload, context.activity_ids
        action = request.action
        payload = (
            f'<{action}Response xmlns="{AUTOSCALING_XMLNS}">'
            f"{body if body is not None else ''}"
            f"<ResponseMetadata>{xml_element('RequestId', request_id)}</ResponseMetadata>"
            f"</{action}Response>"
        ).encode()
        return 200, response_headers("text/xml", payload, request_id), payload, context.activity_ids

    def _act(self, engine: ScalingEngine, request: AwsRequest) -> str | None:
        """Carry out one of the calls in ``answered_here`` (not DescribeScalingActivities); the
        ``<...Result>`` element of the answer, if it has one."""
        params = request.params
        action = request.action
        if action == "SetDesiredCapacity":
            desired = request.desired_capacity
            if request.asg_name is None or desired is None:
                raise ValueError("AutoScalingGroupName and DesiredCapacity are required")
            engine.set_desired(request.asg_name, desired)
            return None
        if action == "TerminateInstanceInAutoScalingGroup":
            instance_id = params.get("InstanceId")
            decrement = params.get("ShouldDecrementDesiredCapacity")
            if not instance_id or decrement is None:
                raise ValueError("InstanceId and ShouldDecrementDesiredCapacity are required")
            activity = engine.terminate_in_group(instance_id, decrement.lower() == "true")
            return (
                "<TerminateInstanceInAutoScalingGroupResult>"
                f"<Activity>{activity.to_xml_fields()}</Activity>"
                "</TerminateInstanceInAutoScalingGroupResult>"
            )
        asg = request.asg_name
        if not asg or not params.get("LifecycleHookName"):
            raise ValueError("AutoScalingGroupName and LifecycleHookName are required")
        instance_id, token = params.get("InstanceId"), params.get("LifecycleActionToken")
        if action == "CompleteLifecycleAction":
            result = params.get("LifecycleActionResult")
            if not result:
                raise ValueError("LifecycleActionResult is required")
            engine.complete_lifecycle_action(asg, instance_id, token, result)
            return "<CompleteLifecycleActionResult/>"
        engine.record_heartbeat(asg, instance_id, token)
        return "<RecordLifecycleActionHeartbeatResult/>"

    def _call_moto(
        self, environ: dict[str, Any], request: AwsRequest, observe: bool
    ) -> tuple[str, list[tuple[str, str]], list[bytes], list[str]]:
        """Run moto's app to completion under the world lock; (status line, headers, body chunks,
        the activities the call produced)."""
        captured: dict[str, Any] = {}
        written: list[bytes] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
            captured["status"], captured["headers"] = status, headers
            return written.append

        engine = self.world.engine
        scope = engine.request(request.label()) if observe and engine is not None else nullcontext()
        with self.world.lock, scope as context:
            result = self.moto_app(environ, capture)
            try:
                chunks = written + list(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
            if request.action == "UpdateAutoScalingGroup" and captured["status"].startswith("200"):
                self._keep_capacity_rebalance(request)
        activity_ids = context.activity_ids if context is not None else []
        return captured["status"], captured["headers"], chunks, activity_ids

    def _keep_capacity_rebalance(self, request: AwsRequest) -> None:
        """moto 5.2.5 takes CapacityRebalance only at creation; AWS also changes it on update."""
        value = request.params.get("CapacityRebalance")
        group = self.world.find_group(request.asg_name) if request.asg_name else None
        if value is not None and group is not None:
            group.capacity_rebalance = value.lower() == "true"


def error_of(status: int, body: bytes) -> tuple[str, str] | None:
    """(Code, Message) of an AWS error answer."""
    if status < 400:
        return None
    code, message = ERROR_CODE.search(body), ERROR_MESSAGE.search(body)
    return (
        code.group(1).decode(errors="replace") if code else str(status),
        message.group(1).decode(errors="replace") if message else "",
    )
