"""Running a recipe on Kubernetes: rendering its objects, talking to the API, driving the stage Jobs.

Layers (kept by import order, lowest first): ``gojson`` → ``render`` (pure: recipe → dicts) → ``api`` (the
cluster behind an interface; the only module that imports ``kubernetes``) → ``driver`` and ``launcher``
(submit/status/logs/cancel/list over that interface). The CLI (``kubetune.cli.cluster``; the driver pod's
``kubetune drive``: ``kubetune.cli.pod``) sits on top. All of them are the client's layer in .importlinter;
``chartgen``, ``generate`` and ``ui_values`` are build-time code (``make schema`` writes the chart's files from ``render``), the layer above it (they may read everything, nothing reads them).
"""
