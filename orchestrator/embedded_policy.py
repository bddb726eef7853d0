"""Ray Train's fixed-size scaling policy for an embedded Ray: without the autoscaling coordinator.

The coordinator tells an autoscaler what a run will need. Ray Train 2.60 starts it when the controller
starts (a singleton actor: a fresh process that imports Ray Data, seconds on two cores) and waits for
its answer before the first worker starts. An embedded Ray is one node of fixed size, with no
autoscaler to tell. The elastic policy reads the cluster's free resources from the coordinator, so it
keeps it; so does every run on a cluster.

Its own module, imported only for an embedded run: the controller actor unpickles the policy by
this name, and Ray Train's internals are imported here, not where a run is planned.
"""

from __future__ import annotations

from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

for _name in ("_send_resource_request", "_maybe_send_resource_request", "_cancel_resource_request"):
    if not hasattr(FixedScalingPolicy, _name):  # a Ray whose policy talks to the coordinator otherwise
        raise ImportError(f"ray.train's FixedScalingPolicy has no {_name}")


class EmbeddedFixedScalingPolicy(FixedScalingPolicy):
    """As Ray's fixed-size policy decides, without resource requests to the coordinator."""

    def _send_resource_request(self) -> None:
        pass

    def _maybe_send_resource_request(self) -> None:
        pass

    def _cancel_resource_request(self) -> None:
        pass


def without_coordinator(policy: object) -> object:
    """`policy` less its coordinator requests where it is Ray's fixed-size policy; any other (elastic) as given."""
    if type(policy) is FixedScalingPolicy:
        return EmbeddedFixedScalingPolicy(policy.scaling_config)
    return policy
