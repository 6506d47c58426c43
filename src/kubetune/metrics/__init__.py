"""Prometheus metrics of a running stage: GPU memory (NVML, read at scrape time), torch's allocator, training and
quantization progress, stage status and duration; a ``/metrics`` server in each stage pod and a Pushgateway push
of the final values. docs/monitoring.md explains every series and how to read them beside NVIDIA's DCGM exporter.

Layout:
    names.py      every metric name, label and help text (the one place they are spelled)
    state.py      StageState: what the stage tells us (progress, loss, status), thread-safe, no I/O
    collector.py  StageCollector: turns a StageState plus NVML and torch (injected) into metric families
    exporter.py   StageMonitor: the collector, the HTTP server and the Pushgateway around one stage
    callbacks.py  the Trainer callback that feeds StageState from the fine-tune
    assets.py     the Grafana dashboard, the alert rules and the chart/kustomize files generated from them
    watch.py      `kubetune watch`: stage pods' /metrics through the API server's pod proxy

Nothing here imports prometheus_client, torch or kubernetes at package import: ``kubetune --help`` stays fast.
"""
