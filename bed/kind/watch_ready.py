"""Watches a workload's pods for scripts/e2e-kind and prints how many are available at every change.

A pod counts while its Ready condition is True and it is not being deleted (an evicted pod stops
counting the moment its deletion starts, stricter than the disruption controller). Prints
``WATCHING`` once the watch has started (the initial list seen), then ``AVAILABLE N NODES`` after
every event that changed N or the nodes the available pods run on. SIGTERM stops it.

    python bed/kind/watch_ready.py KUBECONFIG NAMESPACE LABEL_SELECTOR
"""

import signal
import sys
from typing import Any

from kubernetes import client, config, watch


def available(pod: Any) -> bool:
    if pod.metadata.deletion_timestamp is not None:
        return False
    conditions = (pod.status.conditions if pod.status is not None else None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def main(kubeconfig: str, namespace: str, selector: str) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    core = client.CoreV1Api(config.new_client_from_config(config_file=kubeconfig))
    listed = core.list_namespaced_pod(namespace, label_selector=selector)
    pods = {pod.metadata.name: pod for pod in listed.items}
    last = None

    def report() -> None:
        nonlocal last
        up = [pod for pod in pods.values() if available(pod)]
        line = f"AVAILABLE {len(up)} {','.join(sorted({pod.spec.node_name or '-' for pod in up})) or '-'}"
        if line != last:
            print(line, flush=True)
            last = line

    report()
    print("WATCHING", flush=True)
    version = listed.metadata.resource_version
    while True:
        stream = watch.Watch().stream(
            core.list_namespaced_pod, namespace, label_selector=selector, resource_version=version
        )
        for event in stream:
            pod = event["object"]
            version = pod.metadata.resource_version
            if event["type"] == "DELETED":
                pods.pop(pod.metadata.name, None)
            else:
                pods[pod.metadata.name] = pod
            report()


if __name__ == "__main__":
    main(*sys.argv[1:4])
