"""The AWS side of the test bed: moto plus what moto lacks.

Modules:

- ``protocol``   -- reading AWS requests (SigV4 scope, Query/JSON actions) and writing AWS-style XML.
- ``calls``      -- the log of every AWS call the bed answered.
- ``activities`` -- recorded Auto Scaling activities and DescribeScalingActivities.
- ``faults``     -- faults a test arms: spot capacity failure per ASG, injected API errors.
- ``world``      -- moto's in-process backends behind one lock, plus the bed's view of them.
- ``control``    -- the JSON control API under ``/_bed/``.
- ``gateway``    -- the WSGI app in front of moto that ties the above together.
- ``nodes``      -- the node bridge: moto instances mirrored as Kubernetes Nodes.
"""
