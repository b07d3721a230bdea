"""The bed's Auto Scaling: how an ASG launches and terminates its instances, over time, as AWS does.

moto 5.2.5 makes an instance ``InService`` the moment desired capacity rises and removes it the
moment it is terminated. ``ScalingEngine.install`` replaces the three places moto changes an ASG's
membership (``FakeAutoScalingGroup.set_desired_capacity``, ``replace_autoscaling_group_instances``
and ``AutoScalingBackend.notify_terminate_instances``) with the engine, which:

- launches one instance per missing unit of capacity, each with its own activity. A launch goes
  ``WaitingForSpotInstanceId`` (a spot ASG with a spot wait set) -> ``PreInService`` while the
  instance is ``Pending`` for the ASG's launch delay -> ``MidLifecycleAction`` while a launch
  lifecycle hook holds it in ``Pending:Wait`` -> ``Successful`` once ``InService``;
- fails a launch when a capacity fault takes it (a ``Failed`` activity per attempt) and tries again
  after a backoff, as AWS keeps retrying until the desired capacity is met;
- terminates over the ASG's termination delay: ``Terminating`` (or ``Terminating:Wait`` under a
  termination hook, then ``Terminating:Proceed``) -> gone, its activity ``InProgress`` ->
  ``Successful``;
- chooses scale-in victims among unprotected instances only (scale-in protection), oldest first;
- refuses what AWS refuses: a terminate-with-decrement at MinSize, a desired capacity outside
  [MinSize, MaxSize] (see ``AwsRefusal``).

Every method expects ``world.lock`` held (the engine's ticker takes it). Delays of 0 make the step
happen at once, inside the call.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from moto.autoscaling.models import AutoScalingBackend, FakeAutoScalingGroup, InstanceState

from .activities import Activity, ActivityLog
from .faults import CapacityFaults

if TYPE_CHECKING:
    from .world import MotoWorld

log = logging.getLogger(__name__)

LAUNCH_TRANSITION = "autoscaling:EC2_INSTANCE_LAUNCHING"
TERMINATE_TRANSITION = "autoscaling:EC2_INSTANCE_TERMINATING"

# Lifecycle states that count toward an ASG's capacity (desired capacity is met by these).
IN_CAPACITY = frozenset({"Pending", "Pending:Wait", "Pending:Proceed", "InService"})
LEAVING = frozenset({"Terminating", "Terminating:Wait", "Terminating:Proceed"})

GROUP = "AutoScalingGroup"
RETRY_CAP = 10.0


class AwsRefusal(Exception):
    """A request AWS refuses with ValidationError; the message is AWS's own text."""


def cause_time(moment: datetime) -> str:
    """Times inside an activity's Cause text, as AWS writes them: ``2026-11-25T17:00:00Z``."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_text() -> str:
    return cause_time(datetime.now(timezone.utc))


def join_sentences(*sentences: str) -> str:
    return "  ".join(s for s in sentences if s)


def desired_change_cause(action: str, old: int, new: int, group: FakeAutoScalingGroup) -> str:
    """The sentence AWS starts a Cause with when a user request changed the desired capacity."""
    at = now_text()
    if action == "SetDesiredCapacity":
        return (
            f"At {at} a user request explicitly set group desired capacity "
            f"changing the desired capacity from {old} to {new}."
        )
    if action == "UpdateAutoScalingGroup":
        return (
            f"At {at} a user request update of AutoScalingGroup constraints to min: {group.min_size}, "
            f"max: {group.max_size}, desired: {new} changing the desired capacity from {old} to {new}."
        )
    if action == "CreateAutoScalingGroup":
        return f"At {at} a user request created an AutoScalingGroup changing the desired capacity from 0 to {new}."
    if action == "DeleteAutoScalingGroup":
        return f"At {at} a user request deleted the AutoScalingGroup changing the desired capacity from {old} to 0."
    return ""


def desired_out_of_bounds(desired: int, group: FakeAutoScalingGroup) -> str | None:
    """AWS's ValidationError text for a SetDesiredCapacity outside [MinSize, MaxSize], if it is."""
    if group.max_size is not None and desired > group.max_size:
        return f"New SetDesiredCapacity value {desired} is above max value {group.max_size} for the {GROUP}."
    if group.min_size is not None and desired < group.min_size:
        return f"New SetDesiredCapacity value {desired} is below min value {group.min_size} for the {GROUP}."
    return None


def min_size_refusal(group: FakeAutoScalingGroup) -> str:
    return (
        f"Currently, desiredSize equals minSize ({group.min_size}). Terminating instance without replacement "
        "will violate group's min size constraint. Either set shouldDecrementDesiredCapacity flag to false or "
        "lower group's min size."
    )


def abandoned_message(token: str, reason: str) -> str:
    return (
        "Instance failed to complete user's Lifecycle Action: "
        f"Lifecycle Action with token {token} was abandoned: {reason}"
    )


def zone_details(zone: str, subnet_id: str | None = None) -> str:
    details = {"Subnet ID": subnet_id, "Availability Zone": zone}
    return json.dumps({k: v for k, v in details.items() if v}, separators=(",", ":"))


@dataclass(frozen=True)
class Timing:
    """How long an ASG's steps take, in seconds."""

    launch_delay: float = 1.0  # Pending -> InService
    termination_delay: float = 1.0  # Terminating -> Terminated
    boot_delay: float = 2.0  # InService -> its Node registers (the node bridge reads it)
    spot_wait: float = 0.0  # WaitingForSpotInstanceId before a spot launch is attempted
    retry_delay: float = 1.0  # first wait before a failed launch is tried again (doubles, up to 10 s)

    def to_json(self) -> dict[str, float]:
        return {
            "launch_delay": self.launch_delay,
            "termination_delay": self.termination_delay,
            "boot_delay": self.boot_delay,
            "spot_wait": self.spot_wait,
            "retry_delay": self.retry_delay,
        }


TIMING_FIELDS = tuple(Timing().to_json())


@dataclass
class Launch:
    """One launch in flight: its activity, and the instance once EC2 gave one."""

    group: FakeAutoScalingGroup
    activity: Activity
    phase: str  # "spot-wait", "pending" or "hook-wait"
    due: float
    state: InstanceState | None = None
    token: str | None = None


@dataclass
class Termination:
    group: FakeAutoScalingGroup
    state: InstanceState
    activity: Activity
    phase: str  # "terminating" or "hook-wait"
    due: float
    token: str | None = None


@dataclass
class Retry:
    due: float
    delay: float


@dataclass
class Context:
    """The request being served: its action (for Cause texts) and the activities it produced."""

    action: str
    activity_ids: list[str] = field(default_factory=list)


class ScalingEngine:
    def __init__(
        self,
        world: MotoWorld,
        activities: ActivityLog,
        capacity_faults: CapacityFaults,
        defaults: Timing,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.world = world
        self.activities = activities
        self.capacity_faults = capacity_faults
        self.defaults = defaults
        self.clock = clock
        self._timings: dict[str, Timing] = {}
        self._launches: list[Launch] = []
        self._terminations: dict[str, Termination] = {}  # by instance id
        self._retries: dict[str, Retry] = {}  # by ASG name
        self._backoff: dict[str, float] = {}
        self._failed_zone: dict[str, str] = {}
        self._context: Context | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- settings ---------------------------------------------------------------------------------

    def timing(self, asg_name: str | None) -> Timing:
        return self._timings.get(asg_name or "", self.defaults)

    def set_timing(self, asg_name: str, changes: dict[str, float]) -> Timing:
        """Change some of an ASG's timings (the ASG need not exist yet)."""
        timing = replace(self.timing(asg_name), **changes)
        self._timings[asg_name] = timing
        return timing

    def forget_timings(self) -> None:
        self._timings.clear()

    # -- the request context ----------------------------------------------------------------------

    @contextmanager
    def request(self, action: str) -> Iterator[Context]:
        """Serve one request: Cause texts name its action; its activities are collected."""
        outer, self._context = self._context, Context(action)
        try:
            yield self._context
        finally:
            self._context = outer

    def _record(self, activity: Activity) -> Activity:
        self.activities.add(activity)
        if self._context is not None:
            self._context.activity_ids.append(activity.activity_id)
        return activity

    # -- moto's hooks -------------------------------------------------------------------------------

    def install(self) -> None:
        """Route moto's ASG membership changes through this engine (see the module doc)."""
        engine = self

        def set_desired_capacity(group: FakeAutoScalingGroup, new_capacity: int | None) -> None:
            old = getattr(group, "desired_capacity", None) or 0
            group.desired_capacity = group.min_size if new_capacity is None else new_capacity
            action = engine._context.action if engine._context else ""
            prefix = (
                desired_change_cause(action, old, group.desired_capacity or 0, group)
                if old != group.desired_capacity
                else ""
            )
            engine.reconcile(group, prefix)

        def replace_autoscaling_group_instances(
            group: FakeAutoScalingGroup, count_needed: int, propagated_tags: dict[str, str]
        ) -> None:
            engine.reconcile(group)

        def notify_terminate_instances(backend: AutoScalingBackend, instance_ids: list[str]) -> None:
            engine.instances_gone(backend, instance_ids)

        if not hasattr(FakeAutoScalingGroup, "_bed_original_replace"):
            FakeAutoScalingGroup._bed_original_replace = FakeAutoScalingGroup.replace_autoscaling_group_instances  # type: ignore[attr-defined]
        FakeAutoScalingGroup.set_desired_capacity = set_desired_capacity  # type: ignore[method-assign]
        FakeAutoScalingGroup.replace_autoscaling_group_instances = replace_autoscaling_group_instances  # type: ignore[method-assign,assignment]
        AutoScalingBackend.notify_terminate_instances = notify_terminate_instances  # type: ignore[method-assign]

    # -- the ticker -------------------------------------------------------------------------------

    def start(self, interval: float = 0.1) -> None:
        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    with self.world.lock:
                        self.tick()
                except Exception:  # one bad step must not end the ASGs' clock
                    log.exception("scaling tick failed")

        self._thread = threading.Thread(target=run, name="scaling", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)

    def tick(self) -> None:
        """Take every step that is due."""
        now = self.clock()
        for launch in [lt for lt in self._launches if lt.due <= now]:
            if launch in self._launches:
                self._advance_launch(launch)
        for termination in [t for t in self._terminations.values() if t.due <= now]:
            self._advance_termination(termination)
        expired = set(self.capacity_faults.expire())
        for name, retry in list(self._retries.items()):
            if retry.due <= now or name in expired:
                del self._retries[name]
                group = self.world.find_group(name)
                if group is not None:
                    self.reconcile(group)

    # -- capacity ---------------------------------------------------------------------------------

    def capacity(self, group: FakeAutoScalingGroup) -> int:
        members = sum(1 for s in group.instance_states if s.lifecycle_state in IN_CAPACITY)
        waiting = sum(1 for lt in self._launches if lt.group is group and lt.state is None)
        return members + waiting

    def reconcile(self, group: FakeAutoScalingGroup, prefix: str = "") -> None:
        """Launch or terminate until the ASG's capacity meets its desired capacity."""
        capacity = self.capacity(group)
        desired = group.desired_capacity or 0
        at = now_text()
        if desired > capacity:
            cause = join_sentences(
                prefix,
                f"At {at} an instance was started in response to a difference between desired and actual "
                f"capacity, increasing the capacity from {capacity} to {desired}.",
            )
            for _ in range(desired - capacity):
                self._start_launch(group, cause)
        elif desired < capacity:
            cause = join_sentences(
                prefix,
                f"At {at} an instance was taken out of service in response to a difference between desired "
                f"and actual capacity, shrinking the capacity from {capacity} to {desired}.",
            )
            for victim in self._scale_in_victims(group, capacity - desired):
                if isinstance(victim, Launch):
                    self._launches.remove(victim)
                    victim.activity.set_status("Cancelled", "Launch cancelled: desired capacity lowered.", None)
                else:
                    self.start_termination(group, victim, cause)

    def _scale_in_victims(self, group: FakeAutoScalingGroup, count: int) -> list[Launch | InstanceState]:
        """Unlaunched spot requests first, then unprotected instances, oldest first."""
        waiting: list[Launch | InstanceState] = [lt for lt in self._launches if lt.group is group and lt.state is None]
        members: list[Launch | InstanceState] = [
            s for s in group.instance_states if s.lifecycle_state in IN_CAPACITY and not s.protected_from_scale_in
        ]
        return (waiting + members)[:count]

    # -- launches ---------------------------------------------------------------------------------

    def _start_launch(self, group: FakeAutoScalingGroup, cause: str) -> None:
        timing = self.timing(group.name)
        from .world import group_capacity_type

        spot_wait = timing.spot_wait > 0 and group_capacity_type(group) == "SPOT"
        activity = self._record(
            Activity(
                asg_name=group.name,
                region=group.region,
                description="Launching a new EC2 instance",
                cause=cause,
                status_code="WaitingForSpotInstanceId" if spot_wait else "PreInService",
                asg_arn=group.arn,
            )
        )
        launch = Launch(group, activity, "spot-wait", self.clock() + timing.spot_wait)
        self._launches.append(launch)
        if not spot_wait:
            self._attempt(launch)

    def _pick_zone(self, group: FakeAutoScalingGroup) -> str:
        """The ASG's zone with the fewest members; after a failed launch, another zone first (as AWS
        balances across zones and moves on from one short of capacity)."""
        zones = list(group.availability_zones or [f"{group.region}a"])
        counts = {z: 0 for z in zones}
        for state in group.instance_states:
            if state.instance.placement.zone in counts:
                counts[state.instance.placement.zone] += 1
        failed = self._failed_zone.get(group.name)
        return min(zones, key=lambda z: (z == failed, counts[z], zones.index(z)))

    def _attempt(self, launch: Launch) -> None:
        """Ask EC2 for the instance: a capacity fault fails it, else it starts Pending."""
        from .world import group_capacity_type, template_market_type

        group, activity = launch.group, launch.activity
        zone = self._pick_zone(group)
        message = self.capacity_faults.take(
            group.name, zone, spot=group_capacity_type(group) == "SPOT", instance_type=group.instance_type
        )
        if message is not None:
            self._launches.remove(launch)
            self._failed_zone[group.name] = zone
            activity.description = f"Launching a new EC2 instance.  Status Reason: {message}"
            activity.details = zone_details(zone)
            activity.set_status("Failed", message, None)
            self._schedule_retry(group)
            log.info("ASG %s: a launch failed (%s)", group.name, message)
            return
        before = {s.instance.id for s in group.instance_states}
        zones = group.availability_zones
        group.availability_zones = [zone]
        try:
            FakeAutoScalingGroup._bed_original_replace(group, 1, group.get_propagated_tags())  # type: ignore[attr-defined]
        finally:
            group.availability_zones = zones
        state = next(s for s in group.instance_states if s.instance.id not in before)
        if template_market_type(group) == "spot":
            # moto only marks RunInstances' own spot requests; an ASG launch is spot too.
            state.instance.lifecycle = "spot"
        state.lifecycle_state = "Pending"
        launch.state = launch.state or state
        launch.phase = "pending"
        launch.due = self.clock() + self.timing(group.name).launch_delay
        activity.description = f"Launching a new EC2 instance: {state.instance.id}"
        activity.details = zone_details(zone, state.instance.subnet_id)
        activity.set_status("PreInService", None, 30)
        self._backoff.pop(group.name, None)
        self._failed_zone.pop(group.name, None)
        log.info("ASG %s: launching %s in %s", group.name, state.instance.id, zone)
        if launch.due <= self.clock():
            self._advance_launch(launch)

    def _schedule_retry(self, group: FakeAutoScalingGroup) -> None:
        delay = self._backoff.get(group.name, self.timing(group.name).retry_delay)
        self._backoff[group.name] = min(delay * 2, RETRY_CAP)
        due = self.clock() + delay
        current = self._retries.get(group.name)
        if current is None or due < current.due:
            self._retries[group.name] = Retry(due, delay)

    def _hook(self, group: FakeAutoScalingGroup, transition: str) -> Any:
        backend = self.world.autoscaling()
        return next(
            (
                h
                for h in backend.lifecycle_hooks.values()
                if h.auto_scaling_group_name == group.name and h.lifecycle_transition == transition
            ),
            None,
        )

    def _advance_launch(self, launch: Launch) -> None:
        if launch.phase == "spot-wait":
            self._attempt(launch)
            return
        if launch.phase == "pending":
            hook = self._hook(launch.group, LAUNCH_TRANSITION)
            if hook is not None and launch.state is not None:
                launch.phase, launch.token = "hook-wait", str(uuid.uuid4())
                launch.state.lifecycle_state = "Pending:Wait"
                launch.due = self.clock() + float(hook.heartbeat_timeout)
                launch.activity.set_status("MidLifecycleAction", None, 40)
                return
            self._in_service(launch)
            return
        # A launch hook timed out: its default result decides.
        hook = self._hook(launch.group, LAUNCH_TRANSITION)
        result = (hook.default_result if hook is not None else "CONTINUE").upper()
        self._finish_launch_hook(launch, result, "Heartbeat Timeout")

    def _in_service(self, launch: Launch) -> None:
        self._launches.remove(launch)
        assert launch.state is not None
        launch.state.lifecycle_state = "InService"
        launch.activity.set_status("Successful", None, None)
        log.info("ASG %s: %s is InService", launch.group.name, launch.state.instance.id)

    def _finish_launch_hook(self, launch: Launch, result: str, reason: str) -> None:
        if result == "CONTINUE":
            self._in_service(launch)
            return
        assert launch.state is not None and launch.token is not None
        self._launches.remove(launch)
        group, state = launch.group, launch.state
        message = abandoned_message(launch.token, reason)
        launch.activity.description = f"Launching a new EC2 instance: {state.instance.id}.  Status Reason: {message}"
        launch.activity.set_status("Failed", message, None)
        group.instance_states = [s for s in group.instance_states if s is not state]
        self.world.ec2().terminate_instances([state.instance.id])
        self.reconcile(group)

    # -- terminations -----------------------------------------------------------------------------

    def start_termination(
        self, group: FakeAutoScalingGroup, state: InstanceState, cause: str, activity_id: str | None = None
    ) -> Activity:
        """Take an instance out of service; it is gone after the ASG's termination delay."""
        existing = self._terminations.get(state.instance.id)
        if existing is not None:
            return existing.activity
        for launch in [lt for lt in self._launches if lt.state is state]:
            self._launches.remove(launch)
            launch.activity.set_status("Cancelled", "Instance taken out of service before it was InService.", None)
        activity = Activity(
            asg_name=group.name,
            region=group.region,
            description=f"Terminating EC2 instance: {state.instance.id}",
            cause=cause,
            status_code="InProgress",
            details=zone_details(state.instance.placement.zone, state.instance.subnet_id),
            asg_arn=group.arn,
        )
        if activity_id:
            activity.activity_id = activity_id
        self._record(activity)
        hook = self._hook(group, TERMINATE_TRANSITION)
        if hook is not None:
            state.lifecycle_state = "Terminating:Wait"
            activity.set_status("MidLifecycleAction", None, 40)
            termination = Termination(
                group, state, activity, "hook-wait", self.clock() + float(hook.heartbeat_timeout), str(uuid.uuid4())
            )
        else:
            state.lifecycle_state = "Terminating"
            termination = Termination(
                group, state, activity, "terminating", self.clock() + self.timing(group.name).termination_delay
            )
        self._terminations[state.instance.id] = termination
        log.info("ASG %s: terminating %s", group.name, state.instance.id)
        if termination.due <= self.clock():
            self._advance_termination(termination)
        return activity

    def _advance_termination(self, termination: Termination) -> None:
        if termination.phase == "hook-wait":  # the hook timed out; a termination goes on either way
            self._proceed_termination(termination)
            return
        del self._terminations[termination.state.instance.id]
        group, state = termination.group, termination.state
        group.instance_states = [s for s in group.instance_states if s is not state]
        state.lifecycle_state = "Terminated"
        if state.instance.state != "terminated":
            self.world.ec2().terminate_instances([state.instance.id])
        termination.activity.set_status("Successful", None, None)
        log.info("ASG %s: %s terminated", group.name, state.instance.id)

    def _proceed_termination(self, termination: Termination) -> None:
        termination.phase = "terminating"
        termination.state.lifecycle_state = "Terminating:Proceed"
        termination.activity.set_status("InProgress", None, 50)
        termination.due = self.clock() + self.timing(termination.group.name).termination_delay
        if termination.due <= self.clock():
            self._advance_termination(termination)

    def terminate_in_group(self, instance_id: str, decrement: bool, activity_id: str | None = None) -> Activity:
        """TerminateInstanceInAutoScalingGroup, as AWS does it; AwsRefusal for what AWS refuses."""
        found = self.world.find_member(instance_id)
        if found is None:
            raise AwsRefusal(f"Instance Id not found - No managed instance found for instance ID: {instance_id}")
        group, state = found
        existing = self._terminations.get(instance_id)
        if existing is not None:
            return existing.activity
        old = group.desired_capacity or 0
        if decrement:
            if group.min_size is not None and old - 1 < group.min_size:
                raise AwsRefusal(min_size_refusal(group))
            group.desired_capacity = old - 1
        at = now_text()
        shrinking = f", shrinking the capacity from {old} to {old - 1}" if decrement else ""
        cause = f"At {at} instance {instance_id} was taken out of service in response to a user request{shrinking}."
        activity = self.start_termination(group, state, cause, activity_id)
        if not decrement:
            self.reconcile(group)
        return activity

    def set_desired(self, asg_name: str, desired: int, honor_cooldown: bool = False) -> FakeAutoScalingGroup:
        """SetDesiredCapacity with AWS's bounds check; AwsRefusal outside [MinSize, MaxSize]."""
        group = self.world.find_group(asg_name)
        if group is None:
            raise AwsRefusal(f"AutoScalingGroup name not found - AutoScalingGroup '{asg_name}' not found")
        refusal = desired_out_of_bounds(desired, group)
        if refusal is not None:
            raise AwsRefusal(refusal)
        group.set_desired_capacity(desired)
        return group

    # -- EC2 killed instances behind the ASG's back -------------------------------------------------

    def instances_gone(self, backend: AutoScalingBackend, instance_ids: list[str]) -> None:
        """Members EC2 terminated (a spot reclaim, TerminateInstances) leave their ASG, which replaces them."""
        at = now_text()
        for group in list(backend.autoscaling_groups.values()):
            gone = [s for s in group.instance_states if s.instance.id in instance_ids]
            if not gone:
                continue
            group.instance_states = [s for s in group.instance_states if s.instance.id not in instance_ids]
            for state in gone:
                for launch in [lt for lt in self._launches if lt.state is state]:
                    self._launches.remove(launch)
                    launch.activity.set_status("Failed", "Instance terminated before it was InService.", None)
                pending = self._terminations.pop(state.instance.id, None)
                if pending is not None:
                    pending.activity.set_status("Successful", None, None)
                    continue
                state.lifecycle_state = "Terminated"
                self._record(
                    Activity(
                        asg_name=group.name,
                        region=group.region,
                        description=f"Terminating EC2 instance: {state.instance.id}",
                        cause=(
                            f"At {at} an instance was taken out of service in response to an EC2 health check "
                            "indicating it has been terminated or stopped."
                        ),
                        status_code="Successful",
                        details=zone_details(state.instance.placement.zone, state.instance.subnet_id),
                        asg_arn=group.arn,
                    )
                )
            self.reconcile(group)

    # -- lifecycle actions ------------------------------------------------------------------------

    def _waiting(self, asg_name: str, instance_id: str | None, token: str | None) -> Launch | Termination | None:
        for item in [*self._launches, *self._terminations.values()]:
            if item.phase != "hook-wait" or item.group.name != asg_name or item.state is None:
                continue
            if (instance_id and item.state.instance.id == instance_id) or (token and item.token == token):
                return item
        return None

    def complete_lifecycle_action(self, asg_name: str, instance_id: str | None, token: str | None, result: str) -> None:
        item = self._waiting(asg_name, instance_id, token)
        if item is None:
            raise AwsRefusal(f"No active Lifecycle Action found with instance ID {instance_id or token}")
        result = result.upper()
        if result not in ("CONTINUE", "ABANDON"):
            raise AwsRefusal("LifecycleActionResult must be CONTINUE or ABANDON")
        if isinstance(item, Launch):
            self._finish_launch_hook(item, result, "Lifecycle Action Completed with ABANDON Result")
        else:
            self._proceed_termination(item)

    def record_heartbeat(self, asg_name: str, instance_id: str | None, token: str | None) -> None:
        item = self._waiting(asg_name, instance_id, token)
        if item is None:
            raise AwsRefusal(f"No active Lifecycle Action found with instance ID {instance_id or token}")
        transition = LAUNCH_TRANSITION if isinstance(item, Launch) else TERMINATE_TRANSITION
        hook = self._hook(item.group, transition)
        item.due = self.clock() + float(hook.heartbeat_timeout if hook is not None else 3600)

    # -- what the node bridge and the control API read -----------------------------------------------

    def lifecycle_tokens(self, asg_name: str) -> dict[str, str]:
        """Instance id -> the token of its lifecycle action in progress."""
        return {
            item.state.instance.id: item.token
            for item in [*self._launches, *self._terminations.values()]
            if item.group.name == asg_name and item.state is not None and item.token is not None
        }

    def reset(self) -> None:
        """Forget timings and retry backoffs (instances in flight finish as they would)."""
        self._timings.clear()
        self._backoff.clear()
