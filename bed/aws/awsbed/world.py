"""moto's in-process backends, behind one lock, and what the bed reads and changes in them.

moto's models are not thread-safe and the bed serves requests from many threads, so every moto call
(AWS requests, control-API operations, the node bridge's reads, the scaling engine's ticks) holds
``MotoWorld.lock``. How ASGs launch and terminate is the scaling engine's (``scaling.py``), installed
into moto by ``MotoWorld.install_engine``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from moto.autoscaling.models import AutoScalingBackend, FakeAutoScalingGroup, InstanceState, autoscaling_backends
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models import EC2Backend, ec2_backends
from moto.ec2.models.instances import Instance

from .activities import ActivityLog
from .faults import CapacityFaults
from .scaling import LEAVING, ScalingEngine, Timing

log = logging.getLogger(__name__)

# An ASG tag that states the capacity type of its instances outright: "spot" or "on-demand".
CAPACITY_TYPE_TAG = "bed/capacity-type"

# A Linux x86_64 AMI among moto's default AMIs; any known AMI will do if moto drops this one.
PREFERRED_IMAGE_ID = "ami-760aaa0f"


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
    # Seconds from InService to its Node (None: the bridge's default), and whether the instance is
    # on its way out (Terminating): an existing Node stays until it is gone, none is created.
    boot_delay: float | None = None
    leaving: bool = False


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
        self.engine: ScalingEngine | None = None
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

    def install_engine(self, timing: Timing, clock: Callable[[], float] = time.monotonic) -> ScalingEngine:
        """Let the bed's scaling engine launch and terminate ASG instances (see ``scaling.py``)."""
        self.engine = ScalingEngine(self, self.activities, self.capacity_faults, timing, clock)
        self.engine.install()
        return self.engine

    def find_member(self, instance_id: str) -> tuple[FakeAutoScalingGroup, InstanceState] | None:
        """The ASG of this region an instance belongs to, and its state there; call with the lock held."""
        for group in self.autoscaling().autoscaling_groups.values():
            for state in group.instance_states:
                if state.instance.id == instance_id:
                    return group, state
        return None

    def restore_capacity(self, asg_name: str) -> list[str]:
        """Launch what an ASG is missing at once (after its capacity fault is cleared); the new ids."""
        with self.lock:
            group = self.find_group(asg_name)
            if group is None or self.engine is None:
                return []
            before = {s.instance.id for s in group.instance_states}
            self.engine.reconcile(group)
            return [s.instance.id for s in group.instance_states if s.instance.id not in before]

    def reclaim_instance(self, instance_id: str) -> dict[str, Any]:
        """Terminate an instance behind everyone's back, as when AWS reclaims a spot instance.

        An ASG member also leaves its ASG, with the desired capacity unchanged, so the ASG launches
        a replacement (unless a capacity fault takes the launch). Raises moto's
        InvalidInstanceIdError for an unknown id.
        """
        with self.lock:
            found = self.find_member(instance_id)
            group = found[0] if found else None
            before = {s.instance.id for s in group.instance_states} if group else set()
            self.ec2().terminate_instances([instance_id])
            self.autoscaling().notify_terminate_instances([instance_id])
            replacements = (
                [s.instance.id for s in group.instance_states if s.instance.id not in before] if group else []
            )
        return {"id": instance_id, "asg": group.name if group else None, "replacements": replacements}

    def describe_group(self, name: str) -> dict[str, Any] | None:
        with self.lock:
            group = self.find_group(name)
            if group is None:
                return None
            tokens = self.engine.lifecycle_tokens(group.name) if self.engine else {}
            return {
                "name": group.name,
                "desired": group.desired_capacity,
                "min": group.min_size,
                "max": group.max_size,
                "capacity_type": group_capacity_type(group),
                "capacity_fault": self.capacity_faults.is_armed(group.name),
                "timing": self.engine.timing(group.name).to_json() if self.engine else None,
                "tags": tag_dict(group.tags),
                "instances": [
                    {
                        "id": s.instance.id,
                        "lifecycle_state": s.lifecycle_state,
                        "health": s.health_status,
                        "availability_zone": s.instance.placement.zone,
                        "private_dns_name": s.instance.private_dns_name,
                        "state": s.instance.state,
                        "protected_from_scale_in": bool(s.protected_from_scale_in),
                        "lifecycle_action_token": tokens.get(s.instance.id),
                    }
                    for s in group.instance_states
                ],
            }

    # -- the node bridge's view -----------------------------------------------------------------

    def node_candidates(self) -> list[InstanceView]:
        """Running instances that should be Nodes: standalone ones, and InService ASG members (and
        Terminating ones, marked ``leaving``: their Node stays until the instance is gone).

        An instance that was ever an ASG member (moto keeps ``instance.autoscaling_group``) counts
        only while it is a member of that live ASG: once it leaves it, its Node goes. A Pending
        instance has no Node yet.
        """
        with self.lock:
            backend = self.autoscaling()
            views = []
            for instance in self.ec2().all_instances():
                if instance.state != "running" or not instance.private_ip:
                    continue
                group = getattr(instance, "autoscaling_group", None)
                leaving = False
                if group is not None:
                    lifecycle = self._lifecycle(backend, group, instance.id)
                    if lifecycle not in ("InService", *LEAVING):
                        continue
                    leaving = lifecycle in LEAVING
                views.append(self._view(instance, group, leaving))
            return views

    @staticmethod
    def _lifecycle(backend: AutoScalingBackend, group: FakeAutoScalingGroup, instance_id: str) -> str | None:
        if backend.autoscaling_groups.get(group.name) is not group:
            return None
        return next((s.lifecycle_state for s in group.instance_states if s.instance.id == instance_id), None)

    def _view(self, instance: Instance, group: FakeAutoScalingGroup | None, leaving: bool = False) -> InstanceView:
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
            boot_delay=self.engine.timing(group.name).boot_delay if self.engine and group is not None else None,
            leaving=leaving,
        )
