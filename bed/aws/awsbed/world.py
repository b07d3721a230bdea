"""moto's in-process backends, behind one lock, and what the bed adds on top of them.

moto's models are not thread-safe and the bed serves requests from many threads, so every moto call
(AWS requests, control-API operations, the node bridge's reads) holds ``MotoWorld.lock``.

Scaling activities are recorded by diffing: ``observe`` snapshots every ASG's members before and
after an operation and records one Successful activity per instance that joined ("Launching a new
EC2 instance: i-...") or left ("Terminating EC2 instance: i-...").

A spot capacity failure is injected at the one place moto launches ASG instances,
``FakeAutoScalingGroup.replace_autoscaling_group_instances``, which ``install_capacity_guard``
wraps: for an ASG with the fault armed it launches nothing and records a Failed activity instead.
The desired capacity is stored by moto before that point, so the ASG reports the new desired
capacity with fewer instances, as AWS does. Every launch path goes through it: SetDesiredCapacity,
UpdateAutoScalingGroup, CreateAutoScalingGroup, replacement of terminated members.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from moto.autoscaling.models import AutoScalingBackend, FakeAutoScalingGroup, autoscaling_backends
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models import EC2Backend, ec2_backends
from moto.ec2.models.instances import Instance

from .activities import Activity, ActivityLog
from .faults import CapacityFaults

log = logging.getLogger(__name__)

# Operations of the bed itself that change ASG membership (the others are AWS action names).
RECLAIM = "bed:InstanceReclaimed"
CAPACITY_RESTORED = "bed:CapacityRestored"

# An ASG tag that states the capacity type of its instances outright: "spot" or "on-demand".
CAPACITY_TYPE_TAG = "bed/capacity-type"

# A Linux x86_64 AMI among moto's default AMIs; any known AMI will do if moto drops this one.
PREFERRED_IMAGE_ID = "ami-760aaa0f"


def cause_time(moment: datetime) -> str:
    """Times inside an activity's Cause text, as AWS writes them: ``2026-11-25T17:00:00Z``."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def tag_dict(tags: list[dict[str, Any]], key: str = "Key", value: str = "Value") -> dict[str, str]:
    return {t[key]: t[value] for t in tags}


def instance_tags(instance: Instance) -> dict[str, str]:
    return tag_dict(instance.get_tags(), "key", "value")


def template_market_type(group: FakeAutoScalingGroup) -> str | None:
    """The MarketType ("spot") of the launch template version the ASG launches, if any."""
    template = group.ec2_launch_template
    if template is None:
        return None
    try:
        version = template.get_version(getattr(group, "launch_template_version", "$Default"))
    except Exception:  # a version deleted behind the group's back
        return None
    options = version.data.get("InstanceMarketOptions") or {}
    return options.get("MarketType")


def mixed_policy_is_all_spot(policy: dict[str, Any] | None) -> bool:
    """True when a MixedInstancesPolicy asks for no On-Demand capacity at all."""
    if not policy:
        return False
    distribution = policy.get("InstancesDistribution") or {}
    try:
        base = int(distribution.get("OnDemandBaseCapacity", 0))
        above_base = int(distribution.get("OnDemandPercentageAboveBaseCapacity", 100))
    except (TypeError, ValueError):
        return False
    return base == 0 and above_base == 0


def decide_capacity_type(
    asg_tags: dict[str, str],
    instance_lifecycle: str | None,
    market_type: str | None,
    mixed_policy: dict[str, Any] | None,
) -> str:
    """``SPOT`` or ``ON_DEMAND`` for an instance, first rule that applies:

    1. the ASG tag ``bed/capacity-type`` (``spot`` / ``on-demand``) says so outright;
    2. the instance's lifecycle is ``spot`` (moto sets it for RunInstances with
       InstanceMarketOptions; the bed sets it on ASG instances launched from a spot template);
    3. the ASG's launch template version has ``InstanceMarketOptions.MarketType = spot``;
    4. the ASG's MixedInstancesPolicy asks for 0 On-Demand (base 0, 0 % above base);
    5. otherwise ``ON_DEMAND``.
    """
    explicit = asg_tags.get(CAPACITY_TYPE_TAG, "").strip().lower().replace("_", "-")
    if explicit == "spot":
        return "SPOT"
    if explicit in ("on-demand", "ondemand"):
        return "ON_DEMAND"
    if instance_lifecycle == "spot" or market_type == "spot":
        return "SPOT"
    if mixed_policy_is_all_spot(mixed_policy):
        return "SPOT"
    return "ON_DEMAND"


def group_capacity_type(group: FakeAutoScalingGroup, instance: Instance | None = None) -> str:
    return decide_capacity_type(
        tag_dict(group.tags),
        getattr(instance, "lifecycle", None),
        template_market_type(group),
        group.mixed_instances_policy,
    )


@dataclass(frozen=True)
class GroupSnapshot:
    """An ASG's state at one moment, enough to tell what an operation changed."""

    group: FakeAutoScalingGroup
    region: str
    desired: int
    min_size: int | None
    max_size: int | None
    members: dict[str, Instance]

    @property
    def name(self) -> str:
        return self.group.name


Snapshot = dict[tuple[str, str, str], GroupSnapshot]


@dataclass
class Trigger:
    """Why ASG membership may change during an observed operation; it shapes each Cause text."""

    action: str
    # ActivityIds already handed to the caller, by instance id (TerminateInstanceInAutoScalingGroup).
    promised_activity_ids: dict[str, str] = field(default_factory=dict)


@dataclass
class Observation:
    """What an observed operation changed, by ASG name."""

    launched: dict[str, list[str]] = field(default_factory=dict)
    terminated: dict[str, list[str]] = field(default_factory=dict)


def desired_change_cause(trigger: Trigger, before: GroupSnapshot | None, after: GroupSnapshot | None, at: str) -> str:
    """The sentence AWS starts a Cause with when a user request changed the desired capacity."""
    old = before.desired if before else 0
    new = after.desired if after else 0
    if trigger.action == "SetDesiredCapacity":
        return (
            f"At {at} a user request explicitly set group desired capacity "
            f"changing the desired capacity from {old} to {new}."
        )
    if trigger.action == "UpdateAutoScalingGroup" and after is not None:
        return (
            f"At {at} a user request update of AutoScalingGroup constraints to min: {after.min_size}, "
            f"max: {after.max_size}, desired: {new} changing the desired capacity from {old} to {new}."
        )
    if trigger.action == "CreateAutoScalingGroup":
        return f"At {at} a user request created an AutoScalingGroup changing the desired capacity from 0 to {new}."
    if trigger.action == "DeleteAutoScalingGroup":
        return f"At {at} a user request deleted the AutoScalingGroup changing the desired capacity from {old} to 0."
    return ""


def join_sentences(*sentences: str) -> str:
    return "  ".join(s for s in sentences if s)


def launch_cause(
    trigger: Trigger, before: GroupSnapshot | None, after: GroupSnapshot | None, at: str, start: int, end: int
) -> str:
    return join_sentences(
        desired_change_cause(trigger, before, after, at),
        f"At {at} an instance was started in response to a difference between desired and actual "
        f"capacity, increasing the capacity from {start} to {end}.",
    )


def termination_cause(
    trigger: Trigger,
    instance_id: str,
    before: GroupSnapshot | None,
    after: GroupSnapshot | None,
    at: str,
    start: int,
    end: int,
) -> str:
    if trigger.action == "TerminateInstanceInAutoScalingGroup":
        old = before.desired if before else 0
        new = after.desired if after else 0
        shrinking = f", shrinking the capacity from {old} to {new}" if new < old else ""
        return f"At {at} instance {instance_id} was taken out of service in response to a user request{shrinking}."
    if trigger.action in (RECLAIM, "TerminateInstances"):
        return (
            f"At {at} an instance was taken out of service in response to an EC2 health check "
            "indicating it has been terminated or stopped."
        )
    return join_sentences(
        desired_change_cause(trigger, before, after, at),
        f"At {at} an instance was taken out of service in response to a difference between desired "
        f"and actual capacity, shrinking the capacity from {start} to {end}.",
    )


def instance_details(instance: Instance) -> str:
    """An activity's Details: a JSON string, as AWS gives it."""
    details = {"Subnet ID": instance.subnet_id, "Availability Zone": instance.placement.zone}
    return json.dumps({k: v for k, v in details.items() if v}, separators=(",", ":"))


@dataclass(frozen=True)
class InstanceView:
    """A running moto instance as the node bridge needs it (plain data, safe outside the lock)."""

    instance_id: str
    private_dns_name: str
    private_ip: str
    availability_zone: str
    region: str
    instance_type: str
    instance_tags: dict[str, str]
    asg_name: str | None
    asg_tags: dict[str, str]
    capacity_type: str


class MotoWorld:
    """The bed's handle on moto's backends for one account (moto's default) and region."""

    def __init__(
        self,
        region: str,
        activities: ActivityLog,
        capacity_faults: CapacityFaults,
        account_id: str = DEFAULT_ACCOUNT_ID,
    ) -> None:
        self.region = region
        self.account_id = account_id
        self.activities = activities
        self.capacity_faults = capacity_faults
        self.lock = threading.RLock()

    # -- backends -------------------------------------------------------------------------------

    def autoscaling(self) -> AutoScalingBackend:
        return autoscaling_backends[self.account_id][self.region]

    def ec2(self) -> EC2Backend:
        return ec2_backends[self.account_id][self.region]

    @staticmethod
    def _existing_autoscaling_backends() -> Iterator[tuple[str, str, AutoScalingBackend]]:
        """Every (account, region, backend) moto has created so far, without creating any."""
        for account_id, per_account in dict.items(autoscaling_backends):
            for region, backend in dict.items(per_account):
                yield account_id, region, backend

    def find_group(self, name: str) -> FakeAutoScalingGroup | None:
        """The ASG of that name, if any; call with the lock held."""
        return self.autoscaling().autoscaling_groups.get(name)

    def group_arn(self, name: str) -> str | None:
        with self.lock:
            group = self.find_group(name)
            return group.arn if group is not None else None

    # -- recording activities -------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        snapshot: Snapshot = {}
        for account_id, region, backend in self._existing_autoscaling_backends():
            for group in backend.autoscaling_groups.values():
                snapshot[(account_id, region, group.name)] = GroupSnapshot(
                    group=group,
                    region=region,
                    desired=group.desired_capacity or 0,
                    min_size=group.min_size,
                    max_size=group.max_size,
                    members={s.instance.id: s.instance for s in group.instance_states},
                )
        return snapshot

    @contextmanager
    def observe(self, trigger: Trigger) -> Iterator[Observation]:
        """Hold the lock around an operation and record the launches and terminations it caused."""
        with self.lock:
            observation = Observation()
            before = self.snapshot()
            try:
                yield observation
            finally:
                self._record_changes(before, self.snapshot(), trigger, observation)

    def _record_changes(self, before: Snapshot, after: Snapshot, trigger: Trigger, observation: Observation) -> None:
        at = cause_time(datetime.now(timezone.utc))
        for key in sorted(before.keys() | after.keys()):
            old, new = before.get(key), after.get(key)
            old_members = old.members if old else {}
            new_members = new.members if new else {}
            gone = [i for i in old_members if i not in new_members]
            came = [i for i in new_members if i not in old_members]
            if not gone and not came:
                continue
            group = (new or old).group  # type: ignore[union-attr]
            region = (new or old).region  # type: ignore[union-attr]
            count = len(old_members)
            for instance_id in gone:
                terminated = Activity(
                    asg_name=group.name,
                    region=region,
                    description=f"Terminating EC2 instance: {instance_id}",
                    cause=termination_cause(trigger, instance_id, old, new, at, count, count - len(gone)),
                    status_code="Successful",
                    details=instance_details(old_members[instance_id]),
                    asg_arn=group.arn,
                )
                terminated.activity_id = trigger.promised_activity_ids.get(instance_id, terminated.activity_id)
                self.activities.add(terminated)
            count -= len(gone)
            for instance_id in came:
                instance = new_members[instance_id]
                if template_market_type(group) == "spot":
                    # moto only marks RunInstances' own spot requests; an ASG launch is spot too.
                    instance.lifecycle = "spot"
                self.activities.add(
                    Activity(
                        asg_name=group.name,
                        region=region,
                        description=f"Launching a new EC2 instance: {instance_id}",
                        cause=launch_cause(trigger, old, new, at, count, count + len(came)),
                        status_code="Successful",
                        details=instance_details(instance),
                        asg_arn=group.arn,
                    )
                )
            if gone:
                observation.terminated.setdefault(group.name, []).extend(gone)
            if came:
                observation.launched.setdefault(group.name, []).extend(came)
            log.info("ASG %s: launched %s, terminated %s (%s)", group.name, came, gone, trigger.action)

    # -- spot capacity failure ------------------------------------------------------------------

    def install_capacity_guard(self) -> None:
        """Make moto's ASG launches fail while the ASG's capacity fault is armed (see module doc)."""
        original = getattr(FakeAutoScalingGroup, "_bed_original_replace", None)
        if original is None:
            original = FakeAutoScalingGroup.replace_autoscaling_group_instances
            FakeAutoScalingGroup._bed_original_replace = original  # type: ignore[attr-defined]
        world = self

        def replace_unless_capacity_fault(
            group: FakeAutoScalingGroup, count_needed: int, propagated_tags: dict[str, str]
        ) -> None:
            if world.capacity_faults.is_armed(group.name):
                world._record_failed_launch(group, count_needed)
                return
            original(group, count_needed, propagated_tags)

        FakeAutoScalingGroup.replace_autoscaling_group_instances = replace_unless_capacity_fault  # type: ignore[method-assign,assignment]

    def _record_failed_launch(self, group: FakeAutoScalingGroup, count_needed: int) -> None:
        zone = group.availability_zones[0] if group.availability_zones else f"{group.region}a"
        message = self.capacity_faults.message(
            group.name,
            spot=group_capacity_type(group) == "SPOT",
            instance_type=group.instance_type,
            zone=zone,
        )
        current = len(group.instance_states)
        at = cause_time(datetime.now(timezone.utc))
        self.activities.add(
            Activity(
                asg_name=group.name,
                region=group.region,
                description=f"Launching a new EC2 instance.  Status Reason: {message}",
                cause=(
                    f"At {at} an instance was started in response to a difference between desired and "
                    f"actual capacity, increasing the capacity from {current} to {current + count_needed}."
                ),
                status_code="Failed",
                status_message=message,
                details=json.dumps({"Availability Zone": zone}, separators=(",", ":")),
                asg_arn=group.arn,
            )
        )
        log.info("ASG %s: launch of %d instance(s) failed: capacity fault armed", group.name, count_needed)

    def restore_capacity(self, asg_name: str) -> list[str]:
        """Launch what an ASG is missing (after its capacity fault is cleared); the new ids."""
        with self.observe(Trigger(CAPACITY_RESTORED)) as observation:
            group = self.find_group(asg_name)
            if group is not None:
                group.set_desired_capacity(group.desired_capacity)
        return observation.launched.get(asg_name, [])

    # -- control-API operations -----------------------------------------------------------------

    def default_image_id(self) -> str:
        with self.lock:
            amis = self.ec2().amis
            if PREFERRED_IMAGE_ID in amis:
                return PREFERRED_IMAGE_ID
            linux = [ami_id for ami_id, ami in amis.items() if not getattr(ami, "platform", None)]
            return (linux or list(amis) or [PREFERRED_IMAGE_ID])[0]

    def create_launch_template(
        self,
        name: str,
        instance_type: str,
        spot: bool,
        image_id: str | None = None,
        instance_tags: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Create an EC2 launch template; raises moto's error if the name is taken."""
        data: dict[str, Any] = {"ImageId": image_id or self.default_image_id(), "InstanceType": instance_type}
        if spot:
            data["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"},
            }
        if instance_tags:
            data["TagSpecifications"] = [
                {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in instance_tags.items()]}
            ]
        with self.lock:
            template = self.ec2().create_launch_template(name, "", data, {})
        return {"id": template.id, "name": template.name, "image_id": data["ImageId"]}

    def run_instance(
        self,
        tags: dict[str, str],
        instance_type: str = "m5.large",
        zone: str | None = None,
        spot: bool = False,
    ) -> Instance:
        """Run one EC2 instance outside any ASG."""
        kwargs: dict[str, Any] = {
            "instance_type": instance_type,
            "is_instance_type_default": False,
            "placement": zone or f"{self.region}a",
            "region_name": self.region,
            "tags": {"instance": dict(tags)},
        }
        if spot:
            kwargs["instance_market_options"] = {"MarketType": "spot"}
        with self.lock:
            reservation = self.ec2().run_instances(self.default_image_id(), 1, None, [], **kwargs)
        return reservation.instances[0]

    def reclaim_instance(self, instance_id: str) -> dict[str, Any]:
        """Terminate an instance behind everyone's back, as when AWS reclaims a spot instance.

        An ASG member also leaves its ASG, with the desired capacity unchanged, so moto's ASG
        launches a replacement (unless the ASG's capacity fault is armed). Raises moto's
        InvalidInstanceIdError for an unknown id.
        """
        with self.observe(Trigger(RECLAIM)) as observation:
            self.ec2().terminate_instances([instance_id])
            self.autoscaling().notify_terminate_instances([instance_id])
        asg = next((name for name, ids in observation.terminated.items() if instance_id in ids), None)
        return {
            "id": instance_id,
            "asg": asg,
            "replacements": observation.launched.get(asg, []) if asg else [],
        }

    def describe_group(self, name: str) -> dict[str, Any] | None:
        with self.lock:
            group = self.find_group(name)
            if group is None:
                return None
            return {
                "name": group.name,
                "desired": group.desired_capacity,
                "min": group.min_size,
                "max": group.max_size,
                "capacity_type": group_capacity_type(group),
                "capacity_fault": self.capacity_faults.is_armed(group.name),
                "tags": tag_dict(group.tags),
                "instances": [
                    {
                        "id": s.instance.id,
                        "lifecycle_state": s.lifecycle_state,
                        "health": s.health_status,
                        "availability_zone": s.instance.placement.zone,
                        "private_dns_name": s.instance.private_dns_name,
                        "state": s.instance.state,
                    }
                    for s in group.instance_states
                ],
            }

    # -- the node bridge's view -----------------------------------------------------------------

    def node_candidates(self) -> list[InstanceView]:
        """Running instances that should be Nodes: standalone ones, and InService ASG members.

        An instance that was ever an ASG member (moto keeps ``instance.autoscaling_group``) counts
        only while it is an InService member of that live ASG: once it leaves it, its Node goes.
        """
        with self.lock:
            backend = self.autoscaling()
            views = []
            for instance in self.ec2().all_instances():
                if instance.state != "running" or not instance.private_ip:
                    continue
                group = getattr(instance, "autoscaling_group", None)
                if group is not None and not self._in_service(backend, group, instance.id):
                    continue
                views.append(self._view(instance, group))
            return views

    @staticmethod
    def _in_service(backend: AutoScalingBackend, group: FakeAutoScalingGroup, instance_id: str) -> bool:
        if backend.autoscaling_groups.get(group.name) is not group:
            return False
        return any(s.instance.id == instance_id and s.lifecycle_state == "InService" for s in group.instance_states)

    def _view(self, instance: Instance, group: FakeAutoScalingGroup | None) -> InstanceView:
        if group is not None:
            capacity_type = group_capacity_type(group, instance)
            asg_tags = tag_dict(group.tags)
        else:
            capacity_type = decide_capacity_type({}, instance.lifecycle, None, None)
            asg_tags = {}
        return InstanceView(
            instance_id=instance.id,
            private_dns_name=instance.private_dns_name,
            private_ip=instance.private_ip or "",
            availability_zone=instance.placement.zone or f"{self.region}a",
            region=self.region,
            instance_type=instance.instance_type,
            instance_tags=instance_tags(instance),
            asg_name=group.name if group is not None else None,
            asg_tags=asg_tags,
            capacity_type=capacity_type,
        )
