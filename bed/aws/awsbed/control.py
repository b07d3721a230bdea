"""The bed's JSON control API under ``/_bed/``: what tests use to arm faults and look inside.

Every answer is JSON; an error is ``{"error": CODE, "message": TEXT}`` with status 400 (bad input),
404 (unknown ASG, instance or activity) or 409 (name already taken).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from moto.core.exceptions import ServiceException
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from .activities import Activity, ActivityLog
from .calls import CallLog
from .faults import CapacityFaults, ErrorInjector, NotReadyFaults, Throttle
from .protocol import AwsRequest, parse_int
from .scaling import TIMING_FIELDS, AwsRefusal, ScalingEngine
from .world import MotoWorld

log = logging.getLogger(__name__)

PREFIX = "/_bed/"

_REQUIRED = object()


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def bad_input(message: str) -> ApiError:
    return ApiError(400, "BadInput", message)


def not_found(message: str) -> ApiError:
    return ApiError(404, "NotFound", message)


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload) + "\n", status=status, mimetype="application/json")


def field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
    """A field of a JSON body, checked for type; ``None`` counts as absent."""
    value = body.get(name)
    if value is None:
        if default is _REQUIRED:
            raise bad_input(f"field {name!r} is required")
        return default
    # bool is an int in Python; don't let true pass for a number.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise bad_input(f"field {name!r} has the wrong type")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def string_map(body: dict[str, Any], name: str) -> dict[str, str]:
    value = field(body, name, dict, {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise bad_input(f"field {name!r} must map strings to strings")
    return value


class ControlApi:
    """WSGI app for ``/_bed/...``; the routes are listed in ``__init__``."""

    def __init__(
        self,
        world: MotoWorld,
        calls: CallLog,
        errors: ErrorInjector,
        capacity_faults: CapacityFaults,
        activities: ActivityLog,
        nodes: Callable[[], dict[str, str] | None],
        not_ready_faults: NotReadyFaults | None = None,
        throttle: Throttle | None = None,
    ) -> None:
        self.world = world
        self.calls = calls
        self.errors = errors
        self.capacity_faults = capacity_faults
        self.activities = activities
        self.nodes = nodes
        self.not_ready_faults = not_ready_faults if not_ready_faults is not None else NotReadyFaults()
        self.throttle = throttle if throttle is not None else Throttle()
        self.url_map = Map(
            [
                Rule("/_bed/health", methods=["GET"], endpoint="health"),
                Rule("/_bed/calls", methods=["GET"], endpoint="list_calls"),
                Rule("/_bed/calls", methods=["DELETE"], endpoint="clear_calls"),
                Rule("/_bed/faults", methods=["GET"], endpoint="list_faults"),
                Rule("/_bed/faults/capacity", methods=["POST"], endpoint="arm_capacity_fault"),
                Rule("/_bed/faults/capacity/<path:asg>", methods=["DELETE"], endpoint="clear_capacity_fault"),
                Rule("/_bed/faults/not-ready", methods=["POST"], endpoint="arm_not_ready_fault"),
                Rule("/_bed/faults/not-ready/<path:asg>", methods=["DELETE"], endpoint="clear_not_ready_fault"),
                Rule("/_bed/faults/errors", methods=["POST"], endpoint="arm_errors"),
                Rule("/_bed/faults/errors", methods=["DELETE"], endpoint="clear_errors"),
                Rule("/_bed/activities", methods=["GET"], endpoint="list_activities"),
                Rule("/_bed/activities", methods=["POST"], endpoint="add_activity"),
                Rule("/_bed/activities/<activity_id>", methods=["PATCH"], endpoint="update_activity"),
                Rule("/_bed/launch-templates", methods=["POST"], endpoint="create_launch_template"),
                Rule("/_bed/instances", methods=["POST"], endpoint="run_instance"),
                Rule("/_bed/instances/<instance_id>", methods=["DELETE"], endpoint="reclaim_instance"),
                Rule("/_bed/asgs/<path:asg>", methods=["GET"], endpoint="describe_asg"),
                Rule("/_bed/nodes", methods=["GET"], endpoint="list_nodes"),
                Rule("/_bed/timing", methods=["GET"], endpoint="default_timing"),
                Rule("/_bed/timing/<path:asg>", methods=["GET"], endpoint="get_timing"),
                Rule("/_bed/timing/<path:asg>", methods=["PUT"], endpoint="set_timing"),
                Rule("/_bed/throttle", methods=["GET"], endpoint="list_throttle"),
                Rule("/_bed/throttle", methods=["POST"], endpoint="arm_throttle"),
                Rule("/_bed/throttle", methods=["DELETE"], endpoint="clear_throttle"),
                Rule("/_bed/neighbour/terminate", methods=["POST"], endpoint="neighbour_terminate"),
                Rule("/_bed/neighbour/desired", methods=["POST"], endpoint="neighbour_desired"),
                Rule("/_bed/reset", methods=["POST"], endpoint="reset"),
            ],
            strict_slashes=False,
        )

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        request = Request(environ)
        try:
            endpoint, args = self.url_map.bind_to_environ(environ).match()
            response = getattr(self, endpoint)(request, **args)
        except HTTPException as exc:  # no such route or method
            response = json_response({"error": exc.name, "message": exc.description}, exc.code or 500)
        except ApiError as exc:
            response = json_response({"error": exc.code, "message": exc.message}, exc.status)
        except ServiceException as exc:  # moto refused
            status = 404 if "NotFound" in exc.code else 409 if "AlreadyExists" in exc.code else 400
            response = json_response({"error": exc.code, "message": exc.message}, status)
        return response(environ, start_response)

    @staticmethod
    def _body(request: Request) -> dict[str, Any]:
        if not request.get_data():
            return {}
        body = request.get_json(force=True, silent=True)
        if not isinstance(body, dict):
            raise bad_input("the body must be a JSON object")
        return body

    # -- endpoints --------------------------------------------------------------------------------

    def health(self, request: Request) -> Response:
        return json_response({"ok": True})

    def list_calls(self, request: Request) -> Response:
        args = request.args
        records = self.calls.query(
            action=args.get("action"),
            asg=args.get("asg"),
            service=args.get("service"),
            since=parse_int(args.get("since")),
            actor=args.get("actor"),
        )
        return json_response([r.to_json() for r in records])

    def clear_calls(self, request: Request) -> Response:
        self.calls.clear()
        return json_response({"cleared": True})

    def list_faults(self, request: Request) -> Response:
        return json_response(
            {
                "capacity": self.capacity_faults.armed(),
                "capacity_rules": self.capacity_faults.describe(),
                "not_ready": self.not_ready_faults.armed(),
                "errors": [rule.to_json() for rule in self.errors.rules()],
            }
        )

    def arm_capacity_fault(self, request: Request) -> Response:
        body = self._body(request)
        asg = field(body, "asg", str)
        try:
            fault = self.capacity_faults.arm(
                asg,
                message=field(body, "message", str, None),
                zone=field(body, "zone", str, None),
                count=field(body, "count", int, None),
                seconds=float(field(body, "seconds", (int, float), 0)) or None,
            )
        except ValueError as exc:
            raise bad_input(str(exc)) from exc
        log.info("capacity fault armed on ASG %s: %s", asg, fault)
        return json_response({"asg": asg, "armed": True, "zone": fault.zone, "count": fault.remaining})

    def clear_capacity_fault(self, request: Request, asg: str) -> Response:
        was_armed = self.capacity_faults.disarm(asg)
        launched = self.world.restore_capacity(asg)
        log.info("capacity fault cleared on ASG %s; launched %s", asg, launched)
        return json_response({"asg": asg, "armed": False, "was_armed": was_armed, "launched": launched})

    def arm_not_ready_fault(self, request: Request) -> Response:
        body = self._body(request)
        asg = field(body, "asg", str)
        self.not_ready_faults.arm(asg)
        log.info("not-Ready fault armed on ASG %s: its new Nodes never turn Ready", asg)
        return json_response({"asg": asg, "armed": True})

    def clear_not_ready_fault(self, request: Request, asg: str) -> Response:
        was_armed = self.not_ready_faults.disarm(asg)
        log.info("not-Ready fault cleared on ASG %s: its held Nodes turn Ready", asg)
        return json_response({"asg": asg, "armed": False, "was_armed": was_armed})

    def arm_errors(self, request: Request) -> Response:
        body = self._body(request)
        actions = field(body, "actions", list, None)
        if actions is not None and not all(isinstance(a, str) for a in actions):
            raise bad_input("field 'actions' must be a list of action names")
        try:
            rule = self.errors.add(
                kind=field(body, "kind", str),
                rate=float(field(body, "rate", (int, float), 1.0)),
                count=field(body, "count", int, None),
                actions=actions,
                seed=field(body, "seed", int, None),
                asg=field(body, "asg", str, None),
            )
        except ValueError as exc:
            raise bad_input(str(exc)) from exc
        log.info("error rule armed: %s", rule.to_json())
        return json_response(rule.to_json())

    def clear_errors(self, request: Request) -> Response:
        self.errors.clear()
        return json_response({"cleared": True})

    def list_activities(self, request: Request) -> Response:
        found = self.activities.query(asg_name=request.args.get("asg"))
        return json_response([a.to_json() for a in found])

    def add_activity(self, request: Request) -> Response:
        body = self._body(request)
        try:
            activity = Activity(
                asg_name=field(body, "asg", str),
                region=field(body, "region", str, self.world.region),
                description=field(body, "description", str, "Launching a new EC2 instance"),
                cause=field(body, "cause", str, "A scaling activity started by the test bed."),
                status_code=field(body, "status", str, "InProgress"),
                status_message=field(body, "status_message", str, None),
                progress=field(body, "progress", int, None),
            )
        except ValueError as exc:
            raise bad_input(str(exc)) from exc
        activity.asg_arn = self.world.group_arn(activity.asg_name)
        self.activities.add(activity)
        return json_response({"activity_id": activity.activity_id, **activity.to_json()}, 201)

    def update_activity(self, request: Request, activity_id: str) -> Response:
        body = self._body(request)
        try:
            activity = self.activities.update(
                activity_id,
                status_code=field(body, "status", str),
                status_message=field(body, "status_message", str, None),
                progress=field(body, "progress", int, None),
            )
        except KeyError as exc:
            raise not_found(f"no activity {activity_id}") from exc
        except ValueError as exc:
            raise bad_input(str(exc)) from exc
        return json_response(activity.to_json())

    def create_launch_template(self, request: Request) -> Response:
        body = self._body(request)
        template = self.world.create_launch_template(
            name=field(body, "name", str),
            instance_type=field(body, "instance_type", str, "m5.large"),
            spot=field(body, "spot", bool, False),
            image_id=field(body, "image_id", str, None),
            instance_tags=string_map(body, "instance_tags"),
        )
        return json_response(template, 201)

    def run_instance(self, request: Request) -> Response:
        body = self._body(request)
        tags = string_map(body, "tags")
        name_tag = field(body, "name_tag", str, None)
        if name_tag is not None:
            tags["Name"] = name_tag
        instance = self.world.run_instance(
            tags=tags,
            instance_type=field(body, "instance_type", str, "m5.large"),
            zone=field(body, "availability_zone", str, None),
            spot=field(body, "spot", bool, False),
        )
        return json_response(
            {
                "id": instance.id,
                "private_dns_name": instance.private_dns_name,
                "private_ip": instance.private_ip,
                "availability_zone": instance.placement.zone,
            },
            201,
        )

    def reclaim_instance(self, request: Request, instance_id: str) -> Response:
        return json_response(self.world.reclaim_instance(instance_id))

    def describe_asg(self, request: Request, asg: str) -> Response:
        group = self.world.describe_group(asg)
        if group is None:
            raise not_found(f"no ASG {asg}")
        return json_response(group)

    def list_nodes(self, request: Request) -> Response:
        nodes = self.nodes()
        if nodes is None:
            raise ApiError(404, "BridgeOff", "the node bridge is off (no --kubeconfig)")
        return json_response(nodes)

    def reset(self, request: Request) -> Response:
        """Forget faults, calls and activities; ASGs short of capacity get their instances first (and
        Nodes held NotReady turn Ready at the bridge's next tick)."""
        for asg in self.capacity_faults.clear():
            self.world.restore_capacity(asg)
        self.not_ready_faults.clear()
        self.errors.clear()
        self.throttle.clear()
        self.calls.clear()
        self.activities.clear()
        with self.world.lock:
            self._engine().reset()
        return json_response({"reset": True})

    # -- timing -----------------------------------------------------------------------------------

    def _engine(self) -> ScalingEngine:
        engine = self.world.engine
        if engine is None:
            raise ApiError(404, "NoEngine", "the scaling engine is not installed")
        return engine

    def default_timing(self, request: Request) -> Response:
        return json_response(self._engine().defaults.to_json())

    def get_timing(self, request: Request, asg: str) -> Response:
        with self.world.lock:
            return json_response({"asg": asg, **self._engine().timing(asg).to_json()})

    def set_timing(self, request: Request, asg: str) -> Response:
        body = self._body(request)
        unknown = set(body) - set(TIMING_FIELDS)
        if unknown:
            raise bad_input(f"unknown timing fields {sorted(unknown)}; known: {list(TIMING_FIELDS)}")
        changes = {name: float(field(body, name, (int, float))) for name in body}
        if any(value < 0 for value in changes.values()):
            raise bad_input("timings must not be negative")
        with self.world.lock:
            timing = self._engine().set_timing(asg, changes)
        log.info("ASG %s timing: %s", asg, timing)
        return json_response({"asg": asg, **timing.to_json()})

    # -- throttling -------------------------------------------------------------------------------

    def list_throttle(self, request: Request) -> Response:
        return json_response([b.to_json() for b in self.throttle.buckets()])

    def arm_throttle(self, request: Request) -> Response:
        body = self._body(request)
        try:
            bucket = self.throttle.add(
                action=field(body, "action", str, None),
                burst=float(field(body, "burst", (int, float))),
                rate=float(field(body, "rate", (int, float))),
                asg=field(body, "asg", str, None),
            )
        except ValueError as exc:
            raise bad_input(str(exc)) from exc
        log.info("throttling armed: %s", bucket.to_json())
        return json_response(bucket.to_json())

    def clear_throttle(self, request: Request) -> Response:
        self.throttle.clear()
        return json_response({"cleared": True})

    # -- the neighbour (a cluster-autoscaler-like actor in the same account) ----------------------

    def _neighbour_call(self, action: str, params: dict[str, str], act: Callable[[], Any]) -> tuple[Any, list[str]]:
        """Run ``act`` as the neighbour's AWS call; it goes into the call log as the neighbour's.
        An AWS refusal becomes a 400 with AWS's code and text."""
        engine = self._engine()
        request = AwsRequest("POST", "/_bed/neighbour", "autoscaling", self.world.region, "query", action, params)
        with self.world.lock, engine.request(action) as context:
            try:
                result = act()
            except AwsRefusal as refusal:
                self.calls.record(request, 400, error=("ValidationError", str(refusal)), actor="neighbour")
                raise ApiError(400, "ValidationError", str(refusal)) from refusal
        self.calls.record(request, 200, activity_ids=context.activity_ids, actor="neighbour")
        return result, context.activity_ids

    def neighbour_terminate(self, request: Request) -> Response:
        """Scale in as cluster-autoscaler does: TerminateInstanceInAutoScalingGroup with a decrement,
        of the given instance or else the ASG's first unprotected InService instance."""
        body = self._body(request)
        asg = field(body, "asg", str)
        instance_id = field(body, "instance", str, None)
        decrement = field(body, "decrement", bool, True)
        with self.world.lock:
            group = self.world.find_group(asg)
            if group is None:
                raise not_found(f"no ASG {asg}")
            if instance_id is None:
                instance_id = next(
                    (
                        s.instance.id
                        for s in group.instance_states
                        if s.lifecycle_state == "InService" and not s.protected_from_scale_in
                    ),
                    None,
                )
                if instance_id is None:
                    raise bad_input(f"ASG {asg} has no unprotected InService instance")
            chosen = instance_id
            params = {"InstanceId": chosen, "ShouldDecrementDesiredCapacity": str(decrement).lower()}
            activity, _ = self._neighbour_call(
                "TerminateInstanceInAutoScalingGroup",
                params,
                lambda: self._engine().terminate_in_group(chosen, decrement),
            )
            desired = group.desired_capacity
        return json_response({"asg": asg, "instance": chosen, "activity_id": activity.activity_id, "desired": desired})

    def neighbour_desired(self, request: Request) -> Response:
        """SetDesiredCapacity as another actor would call it (AWS's bounds apply)."""
        body = self._body(request)
        asg = field(body, "asg", str)
        desired = field(body, "desired", int)
        params = {"AutoScalingGroupName": asg, "DesiredCapacity": str(desired)}
        _, activity_ids = self._neighbour_call(
            "SetDesiredCapacity", params, lambda: self._engine().set_desired(asg, desired)
        )
        return json_response({"asg": asg, "desired": desired, "activity_ids": activity_ids})
