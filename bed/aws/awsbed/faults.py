"""Faults a test can arm and clear: capacity failures on an ASG (all launches, the next N, one zone's,
for T seconds), Nodes of an ASG that never turn Ready, injected API errors, and AWS-like throttling."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .protocol import ACCESS_DENIED, INTERNAL_FAILURE, THROTTLING, ErrorReply

SPOT_CAPACITY_MESSAGE = (
    "Could not launch Spot Instances. InsufficientInstanceCapacity - There is no Spot capacity "
    "available that matches your request. Launching EC2 instance failed."
)

ON_DEMAND_CAPACITY_MESSAGE = (
    "We currently do not have sufficient {instance_type} capacity in the Availability Zone you "
    "requested ({zone}). Our system will be working on provisioning additional capacity. "
    "InsufficientInstanceCapacity - Launching EC2 instance failed."
)


@dataclass
class CapacityFault:
    """Launches in an ASG (or in one of its zones) fail for lack of capacity.

    ``remaining`` launches fail and then capacity returns (None: until cleared); ``until`` is the
    monotonic time the fault clears itself (None: never)."""

    message: str | None = None
    zone: str | None = None
    remaining: int | None = None
    until: float | None = None

    def to_json(self, asg: str, now: float) -> dict[str, Any]:
        return {
            "asg": asg,
            "message": self.message,
            "zone": self.zone,
            "remaining": self.remaining,
            "seconds_left": round(self.until - now, 3) if self.until is not None else None,
        }


class CapacityFaults:
    """Capacity faults by ASG name: each failed launch of that ASG gets the fault's message."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._armed: dict[str, CapacityFault] = {}
        self._clock = clock

    def arm(
        self,
        asg_name: str,
        message: str | None = None,
        zone: str | None = None,
        count: int | None = None,
        seconds: float | None = None,
    ) -> CapacityFault:
        if count is not None and count < 1:
            raise ValueError("count must be at least 1")
        if seconds is not None and seconds <= 0:
            raise ValueError("seconds must be positive")
        fault = CapacityFault(message, zone, count, self._clock() + seconds if seconds is not None else None)
        with self._lock:
            self._armed[asg_name] = fault
        return fault

    def disarm(self, asg_name: str) -> bool:
        """Clear the fault; False if it was not armed."""
        with self._lock:
            return self._armed.pop(asg_name, None) is not None

    def _live(self, asg_name: str) -> CapacityFault | None:
        fault = self._armed.get(asg_name)
        if fault is not None and fault.until is not None and self._clock() >= fault.until:
            del self._armed[asg_name]
            return None
        return fault

    def is_armed(self, asg_name: str) -> bool:
        with self._lock:
            return self._live(asg_name) is not None

    def take(self, asg_name: str, zone: str, spot: bool, instance_type: str) -> str | None:
        """The StatusMessage of this launch's failure if a fault takes it (counting it), else None."""
        with self._lock:
            fault = self._live(asg_name)
            if fault is None or (fault.zone is not None and fault.zone != zone):
                return None
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    del self._armed[asg_name]
        if fault.message:
            return fault.message
        if spot:
            return SPOT_CAPACITY_MESSAGE
        return ON_DEMAND_CAPACITY_MESSAGE.format(instance_type=instance_type, zone=zone)

    def expire(self) -> list[str]:
        """Drop the faults whose time is up; their ASG names."""
        with self._lock:
            now = self._clock()
            gone = [n for n, f in self._armed.items() if f.until is not None and now >= f.until]
            for name in gone:
                del self._armed[name]
            return gone

    def armed(self) -> list[str]:
        with self._lock:
            return sorted(n for n in list(self._armed) if self._live(n) is not None)

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            now = self._clock()
            return [self._armed[n].to_json(n, now) for n in sorted(self._armed) if self._live(n) is not None]

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


ERROR_KINDS: dict[str, ErrorReply] = {
    "throttling": THROTTLING,
    "server": INTERNAL_FAILURE,
    "access-denied": ACCESS_DENIED,
}


@dataclass
class ErrorRule:
    """Fail a fraction ``rate`` of the calls to ``actions`` (all, if None), at most ``count`` times."""

    rule_id: int
    kind: str
    rate: float
    count: int | None
    actions: frozenset[str] | None
    seed: int | None
    asg: str | None = None
    injected: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    @property
    def exhausted(self) -> bool:
        return self.count is not None and self.injected >= self.count

    def matches(self, action: str | None, asgs: frozenset[str]) -> bool:
        return (self.actions is None or action in self.actions) and (self.asg is None or self.asg in asgs)

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
            "asg": self.asg,
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
        asg: str | None = None,
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
                asg=asg,
            )
            self._next_id += 1
            self._rules.append(rule)
            return rule

    def pick(self, action: str | None, asgs: frozenset[str] = frozenset()) -> ErrorReply | None:
        """The error this call is to get instead of an answer, if any rule fires (a rule scoped to
        an ASG only sees calls naming that ASG)."""
        with self._lock:
            for rule in self._rules:
                if rule.matches(action, asgs) and rule.roll():
                    return ERROR_KINDS[rule.kind]
        return None

    def rules(self) -> list[ErrorRule]:
        with self._lock:
            return list(self._rules)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()


@dataclass
class TokenBucket:
    """AWS's request throttling for one action (optionally one ASG's calls): ``burst`` calls at once,
    refilled at ``rate`` per second; a call that finds the bucket empty is throttled."""

    action: str | None
    asg: str | None
    burst: float
    rate: float
    tokens: float
    refilled: float
    throttled: int = 0

    def matches(self, action: str | None, asgs: frozenset[str]) -> bool:
        return (self.action is None or self.action == action) and (self.asg is None or self.asg in asgs)

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.throttled += 1
        return False

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "asg": self.asg,
            "burst": self.burst,
            "rate": self.rate,
            "tokens": round(self.tokens, 3),
            "throttled": self.throttled,
        }


class Throttle:
    """The token buckets armed (none by default: no throttling)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._buckets: list[TokenBucket] = []
        self._clock = clock

    def add(self, action: str | None, burst: float, rate: float, asg: str | None = None) -> TokenBucket:
        if burst < 1:
            raise ValueError("burst must be at least 1")
        if rate < 0:
            raise ValueError("rate must not be negative")
        bucket = TokenBucket(action, asg, float(burst), float(rate), float(burst), self._clock())
        with self._lock:
            self._buckets = [b for b in self._buckets if (b.action, b.asg) != (action, asg)] + [bucket]
        return bucket

    def pick(self, action: str | None, asgs: frozenset[str] = frozenset()) -> ErrorReply | None:
        """THROTTLING if any matching bucket is empty (every matching bucket pays a token)."""
        with self._lock:
            now = self._clock()
            allowed = [b.take(now) for b in self._buckets if b.matches(action, asgs)]
        return None if all(allowed) else THROTTLING

    def buckets(self) -> list[TokenBucket]:
        with self._lock:
            return list(self._buckets)

    def clear(self) -> None:
        with self._lock:
            self._buckets.clear()
