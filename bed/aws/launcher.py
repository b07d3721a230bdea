#!/usr/bin/env python3
"""The test bed's AWS: a moto server plus what moto lacks, and the node bridge, in one process.

    python bed/aws/launcher.py --port 4566 [--host 127.0.0.1] [--region us-east-1]
        [--launch-delay 1] [--termination-delay 1] [--retry-delay 1]
        [--kubeconfig PATH [--boot-delay 2] [--sync-interval 0.5]] [--log-requests]

Serves every AWS service moto serves (point an SDK's endpoint at it; any dummy credentials, moto's
default account 123456789012), with recorded scaling activities, injectable faults and a JSON
control API under ``/_bed/`` (see ``awsbed/control.py``). With ``--kubeconfig``, running instances
are mirrored into that cluster as Nodes (see ``awsbed/nodes.py``).

Prints ``READY http://HOST:PORT`` on stdout once serving (``--port 0`` picks a free port); logs go
to stderr. SIGTERM or SIGINT stops it within about two seconds.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import BaseWSGIServer, make_server

from awsbed.activities import ActivityLog
from awsbed.calls import CallLog
from awsbed.control import ControlApi
from awsbed.faults import CapacityFaults, ErrorInjector, NotReadyFaults, Throttle
from awsbed.gateway import Gateway
from awsbed.nodes import NodeBridge
from awsbed.scaling import ScalingEngine, Timing
from awsbed.world import MotoWorld

log = logging.getLogger("launcher")


def loopback_host(value: str) -> str:
    """argparse type: only loopback addresses (the bed never listens anywhere else)."""
    if value == "localhost":
        return value
    try:
        if ipaddress.ip_address(value).is_loopback:
            return value
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{value} is not a loopback address")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", type=loopback_host, default="127.0.0.1", help="loopback address to bind")
    parser.add_argument("--port", type=int, required=True, help="port to bind; 0 picks a free one")
    parser.add_argument("--region", default="us-east-1", help="region of the control API and node bridge")
    parser.add_argument("--kubeconfig", help="cluster to mirror instances into; the bridge is off without it")
    parser.add_argument(
        "--boot-delay", type=float, default=2.0, help="seconds an instance is InService before its Node appears"
    )
    parser.add_argument(
        "--launch-delay", type=float, default=1.0, help="seconds a new ASG instance is Pending before InService"
    )
    parser.add_argument(
        "--termination-delay", type=float, default=1.0, help="seconds an ASG instance is Terminating before it is gone"
    )
    parser.add_argument(
        "--retry-delay", type=float, default=1.0, help="first wait before an ASG retries a failed launch (doubles)"
    )
    parser.add_argument("--sync-interval", type=float, default=0.5, help="seconds between node bridge ticks")
    parser.add_argument("--log-requests", action="store_true", help="log every HTTP request to stderr")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


@dataclass
class Bed:
    """Everything the process runs, wired together."""

    app: Gateway
    world: MotoWorld
    bridge: NodeBridge | None
    engine: ScalingEngine


def build_bed(region: str, kubeconfig: str | None, timing: Timing, sync_interval: float) -> Bed:
    activities = ActivityLog()
    capacity_faults = CapacityFaults()
    errors = ErrorInjector()
    throttle = Throttle()
    not_ready_faults = NotReadyFaults()
    calls = CallLog()
    world = MotoWorld(region, activities, capacity_faults)
    engine = world.install_engine(timing)
    boot_delay = timing.boot_delay
    bridge = (
        NodeBridge(world, kubeconfig, boot_delay, sync_interval, not_ready_faults=not_ready_faults)
        if kubeconfig
        else None
    )
    control = ControlApi(
        world,
        calls,
        errors,
        capacity_faults,
        activities,
        nodes=(bridge.nodes if bridge else lambda: None),
        not_ready_faults=not_ready_faults,
        throttle=throttle,
    )
    moto_app = DomainDispatcherApplication(create_backend_app)
    app = Gateway(moto_app, control, world, calls, errors, activities, throttle)
    return Bed(app, world, bridge, engine)


def serve(args: argparse.Namespace) -> int:
    timing = Timing(
        launch_delay=args.launch_delay,
        termination_delay=args.termination_delay,
        boot_delay=args.boot_delay,
        retry_delay=args.retry_delay,
    )
    bed = build_bed(args.region, args.kubeconfig, timing, args.sync_interval)
    server: BaseWSGIServer = make_server(
        args.host, args.port, bed.app, threaded=True, request_handler=MotoRequestHandler
    )
    host, port = args.host, server.socket.getsockname()[1]
    # moto builds some URLs that point back at itself from MOTO_PORT.
    os.environ.setdefault("MOTO_PORT", str(port))

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    server_thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http")
    server_thread.start()
    bed.engine.start()
    if bed.bridge is not None:
        bed.bridge.start()
    log.info(
        "serving on %s:%s (region %s, node bridge %s, timing %s)",
        host,
        port,
        args.region,
        "on" if bed.bridge else "off",
        timing.to_json(),
    )
    print(f"READY http://{host}:{port}", flush=True)

    while not stop.wait(0.5):
        pass

    log.info("stopping")
    bed.engine.stop()
    if bed.bridge is not None:
        bed.bridge.stop(timeout=1.5)
    server.shutdown()
    server.server_close()
    server_thread.join(timeout=1.0)
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("werkzeug").setLevel(logging.INFO if args.log_requests else logging.WARNING)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
