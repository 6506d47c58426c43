"""Running a recipe on Kubernetes: rendering its objects, talking to the API, driving the stage Jobs.

Layers (kept by import order, lowest first): ``gojson`` → ``render`` (pure: recipe → dicts) → ``api`` (the
cluster behind an interface; the only module that imports ``kubernetes``) → ``driver`` and ``launcher``
(submit/status/logs/cancel/list over that interface). The CLI (``kubetune.cli.cluster``) sits on top.
``chartgen`` and ``generate`` run at build time (``make schema``): they write the chart's files from ``render``.
"""
