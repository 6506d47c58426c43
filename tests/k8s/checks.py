"""Checks that a schema cannot make: Pod Security "restricted" and OpenShift restricted-v2, and RBAC limits.

Written from the Pod Security Standards (kubernetes.io/docs/concepts/security/pod-security-standards/,
policy version 1.29+) and the restricted-v2 SecurityContextConstraints. Each check returns readable
violations, so a failing test says what to fix.
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate

K8S_VERSIONS = ("1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0")
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def validate(obj: dict[str, Any], versions=K8S_VERSIONS) -> list[str]:
    """kubernetes-validate --strict for each version: unknown fields and wrong types are errors."""
    problems = []
    for version in versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{version}: {exc.message} at {'.'.join(map(str, exc.path))}")
    return problems


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    spec = obj.get("spec") or {}
    if obj.get("kind") == "Pod":
        return spec
    if obj.get("kind") == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]["spec"]
    if "template" in spec:
        return spec["template"]["spec"]
    return None


def pss_restricted(obj: dict[str, Any]) -> list[str]:
    """Violations of Pod Security "restricted" (which includes "baseline") in obj's pod template."""
    spec = pod_spec(obj)
    if spec is None:
        return []
    out: list[str] = []
    psc = spec.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            out.append(f"{field} must not be true")
    for vol in spec.get("volumes") or []:
        kinds = set(vol) - {"name"}
        if kinds - RESTRICTED_VOLUMES:
            out.append(f"volume {vol['name']}: type {sorted(kinds)} not allowed (hostPath and the like)")
    for sysctl in psc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            out.append(f"sysctl {sysctl.get('name')} is not in the safe set")
    containers = [("container", c) for c in spec.get("containers") or []]
    containers += [("initContainer", c) for c in spec.get("initContainers") or []]
    containers += [("ephemeralContainer", c) for c in spec.get("ephemeralContainers") or []]
    for what, c in containers:
        sc = c.get("securityContext") or {}
        where = f"{what} {c.get('name')}"
        if sc.get("privileged"):
            out.append(f"{where}: privileged")
        if (sc.get("windowsOptions") or psc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{where}: hostProcess")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{where}: procMount must be Default")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                out.append(f"{where}: hostPort {port['hostPort']}")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}: allowPrivilegeEscalation must be false")
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            out.append(f"{where}: runAsNonRoot must be true (pod or container)")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            out.append(f"{where}: runAsUser must not be 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{where}: seccompProfile.type must be RuntimeDefault or Localhost (is {seccomp})")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{where}: capabilities must drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{where}: capabilities may add only NET_BIND_SERVICE")
        selinux = sc.get("seLinuxOptions") or psc.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            out.append(f"{where}: seLinuxOptions not allowed")
        apparmor = (sc.get("appArmorProfile") or psc.get("appArmorProfile") or {}).get("type")
        if apparmor == "Unconfined":
            out.append(f"{where}: appArmorProfile Unconfined")
    return out


def openshift_restricted_v2(obj: dict[str, Any]) -> list[str]:
    """What restricted-v2 adds for us: no fixed UID/GID (OpenShift assigns them from the namespace's range)."""
    spec = pod_spec(obj)
    if spec is None:
        return []
    out = pss_restricted(obj)
    psc = spec.get("securityContext") or {}
    for field in ("runAsUser", "runAsGroup", "fsGroup", "supplementalGroups"):
        if field in psc:
            out.append(f"pod securityContext.{field} is fixed; restricted-v2 assigns it")
    for c in spec.get("containers") or []:
        for field in ("runAsUser", "runAsGroup"):
            if field in (c.get("securityContext") or {}):
                out.append(f"container {c['name']}: securityContext.{field} is fixed; restricted-v2 assigns it")
    return out


def rbac_problems(obj: dict[str, Any]) -> list[str]:
    """A Role or ClusterRole with a wildcard, or any access to secrets."""
    if obj.get("kind") not in ("Role", "ClusterRole"):
        return []
    out = []
    for rule in obj.get("rules") or []:
        for field in ("apiGroups", "resources", "verbs", "resourceNames"):
            if "*" in (rule.get(field) or []):
                out.append(f"{obj['metadata']['name']}: wildcard in {field}")
        if any(r.split("/")[0] == "secrets" for r in rule.get("resources") or []):
            out.append(f"{obj['metadata']['name']}: access to secrets")
    if obj["kind"] == "ClusterRole":
        out.append(f"{obj['metadata']['name']}: a ClusterRole (cluster-wide) where a Role does")
    return out


def all_problems(objects: list[dict[str, Any]], openshift: bool = False) -> list[str]:
    """Schema, RBAC, and Pod Security restricted (``openshift``: restricted-v2, which also refuses a fixed
    fsGroup; plain Kubernetes needs one to make a block-storage claim writable)."""
    pod_rules = openshift_restricted_v2 if openshift else pss_restricted
    problems = []
    for obj in objects:
        name = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
        problems += [f"{name}: {p}" for p in validate(obj) + pod_rules(obj) + rbac_problems(obj)]
    return problems
