"""Faults a test can arm and clear: spot capacity failure on an ASG, Nodes of an ASG that never turn
Ready, and injected API errors."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Any

from .protocol import INTERNAL_FAILURE, THROTTLING, ErrorReply

SPOT_CAPACITY_MESSAGE = (
    "Could not launch Spot Instances. InsufficientInstanceCapacity - There is no Spot capacity "
    "available that matches your request. Launching EC2 instance failed."
)

ON_DEMAND_CAPACITY_MESSAGE = (
    "We currently do not have sufficient {instance_type} capacity in the Availability Zone you "
    "requested ({zone}). Our system will be working on provisioning additional capacity. "
    "InsufficientInstanceCapacity - Launching EC2 instance failed."
)


class CapacityFaults:
    """ASG names whose launches fail for lack of capacity, each with an optional custom message."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: dict[str, str | None] = {}

    def arm(self, asg_name: str, message: str | None = None) -> None:
        with self._lock:
            self._armed[asg_name] = message

    def disarm(self, asg_name: str) -> bool:
        """Clear the fault; False if it was not armed."""
        with self._lock:
            if asg_name not in self._armed:
                return False
            del self._armed[asg_name]
            return True

    def is_armed(self, asg_name: str) -> bool:
        with self._lock:
            return asg_name in self._armed

    def message(self, asg_name: str, spot: bool, instance_type: str, zone: str) -> str:
        """The StatusMessage of a failed launch in this ASG."""
        with self._lock:
            custom = self._armed.get(asg_name)
        if custom:
            return custom
        if spot:
            return SPOT_CAPACITY_MESSAGE
        return ON_DEMAND_CAPACITY_MESSAGE.format(instance_type=instance_type, zone=zone)

    def armed(self) -> list[str]:
        with self._lock:
            return sorted(self._armed)

    def clear(self) -> list[str]:
        """Forget every fault; returns the ASG names that were armed."""
        with self._lock:
            names = sorted(self._armed)
            self._armed.clear()
            return names


class NotReadyFaults:
    """ASG names whose new Nodes the node bridge registers with a kubelet that never turns Ready."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: set[str] = set()

    def arm(self, asg_name: str) -> None:
        with self._lock:
            self._armed.add(asg_name)

    def disarm(self, asg_name: str) -> bool:
        """Clear the fault; False if it was not armed."""
        with self._lock:
            if asg_name not in self._armed:
                return False
            self._armed.discard(asg_name)
            return True

    def is_armed(self, asg_name: str | None) -> bool:
        with self._lock:
            return asg_name is not None and asg_name in self._armed

    def armed(self) -> list[str]:
        with self._lock:
            return sorted(self._armed)

    def clear(self) -> list[str]:
        """Forget every fault; returns the ASG names that were armed."""
        with self._lock:
            names = sorted(self._armed)
            self._armed.clear()
            return names


ERROR_KINDS: dict[str, ErrorReply] = {"throttling": THROTTLING, "server": INTERNAL_FAILURE}


@dataclass
class ErrorRule:
    """Fail a fraction ``rate`` of the calls to ``actions`` (all, if None), at most ``count`` times."""

    rule_id: int
    kind: str
    rate: float
    count: int | None
    actions: frozenset[str] | None
    seed: int | None
    injected: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    @property
    def exhausted(self) -> bool:
        return self.count is not None and self.injected >= self.count

    def matches(self, action: str | None) -> bool:
        return self.actions is None or action in self.actions

    def roll(self) -> bool:
        """Decide for one matching call; counts it when it is to fail."""
        if self.exhausted or self._rng.random() >= self.rate:
            return False
        self.injected += 1
        return True

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.rule_id,
            "kind": self.kind,
            "rate": self.rate,
            "count": self.count,
            "actions": sorted(self.actions) if self.actions is not None else None,
            "seed": self.seed,
            "injected": self.injected,
        }


class ErrorInjector:
    """The armed error rules; the first rule that fires decides the error of a call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[ErrorRule] = []
        self._next_id = 1

    def add(
        self,
        kind: str,
        rate: float = 1.0,
        count: int | None = None,
        actions: list[str] | None = None,
        seed: int | None = None,
    ) -> ErrorRule:
        if kind not in ERROR_KINDS:
            raise ValueError(f"kind must be one of {sorted(ERROR_KINDS)}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be between 0 and 1")
        if count is not None and count < 0:
            raise ValueError("count must not be negative")
        with self._lock:
            rule = ErrorRule(
                rule_id=self._next_id,
                kind=kind,
                rate=rate,
                count=count,
                actions=frozenset(actions) if actions is not None else None,
                seed=seed,
            )
            self._next_id += 1
            self._rules.append(rule)
            return rule

    def pick(self, action: str | None) -> ErrorReply | None:
        """The error this call is to get instead of an answer, if any rule fires."""
        with self._lock:
            for rule in self._rules:
                if rule.matches(action) and rule.roll():
                    return ERROR_KINDS[rule.kind]
        return None

    def rules(self) -> list[ErrorRule]:
        with self._lock:
            return list(self._rules)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
