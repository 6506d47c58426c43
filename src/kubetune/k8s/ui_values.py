"""JSON schema of the Helm chart's ``ui`` values (charts/kubetune/templates/ui-*.yaml); kubetune.k8s.generate
puts it in values.schema.json, so a typo under ``ui:`` fails ``helm install`` like one under ``recipe:``."""

from __future__ import annotations

from typing import Any

_QUANTITY = {"type": ["string", "integer"], "pattern": "^[0-9.]+[a-zA-Z]*$"}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}


def _object(doc: str, **properties: Any) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "description": doc, "properties": properties}


_NO_ANONYMOUS_PAGE = "refused without authSecret (no unauthenticated page outside the cluster)"


def ui_values_schema() -> dict[str, Any]:
    host = {"type": "string", "description": "Host name; empty: the router's or controller's default."}
    schema = _object(
        "The compare UI (`kubetune ui`, docs/ui.md): a Deployment that reads the run's artifacts from the claim, "
        "read-only.",
        enabled={"type": "boolean", "description": "Deploy the UI. With a ReadWriteOnce claim it starts only on "
                                                   "the node that holds the claim (or after the run)."},
        port={"type": "integer", "minimum": 1024, "maximum": 65535,
              "description": "Container port (unprivileged: the pod runs as non-root)."},
        gpus={"type": "integer", "minimum": 0, "maximum": 8,
              "description": "GPUs (recipe.kubernetes.gpu_resource) for the models; 0 runs them on the CPU."},
        gpuType={"type": "string", "description": "Value of recipe.kubernetes.gpu_product_label to schedule on."},
        cpu={**_QUANTITY, "description": "CPU request (Kubernetes quantity)."},
        memory={**_QUANTITY, "description": "Host memory request and limit: the models load through it (more than "
                                            "their size while loading)."},
        authSecret={"type": "string", "description": "Secret whose key `auth` holds USER:PASSWORD; empty: no "
                                                     "login of the UI's own (use the route's or ingress's)."},
        route=_object("OpenShift Route to the Service (edge TLS).",
                      enabled={"type": "boolean", "description": f"Create it; {_NO_ANONYMOUS_PAGE}."}, host=host),
        ingress=_object("Ingress to the Service.",
                        enabled={"type": "boolean",
                                 "description": f"Create it; {_NO_ANONYMOUS_PAGE}, unless externalAuth."},
                        host=host,
                        className={"type": "string", "description": "IngressClass; empty: the cluster's default."},
                        annotations={**_STRINGS, "description": "Annotations of your ingress controller, e.g. "
                                                                "basic auth or an OAuth proxy."},
                        tlsSecret={"type": "string", "description": "TLS Secret for host; empty: plain HTTP."},
                        externalAuth={"type": "boolean", "description": (
                            "The annotations put the Ingress behind the controller's own login (e.g. nginx "
                            "auth-url to an oauth2-proxy): then no authSecret is needed. The chart cannot check "
                            "it; true is your word for it.")}),
    )
    # No unauthenticated page from outside the cluster: the UI runs models and SQL on a GPU for whoever reaches it.
    schema["allOf"] = [
        {"if": _enabled("route"), "then": _LOGIN},
        {"if": {"allOf": [_enabled("ingress"), {"not": {"properties": {"ingress": {
            "properties": {"externalAuth": {"const": True}}, "required": ["externalAuth"]}}}}]}, "then": _LOGIN},
    ]
    return schema


def _enabled(exposure: str) -> dict[str, Any]:
    return {"properties": {exposure: {"properties": {"enabled": {"const": True}}, "required": ["enabled"]}},
            "required": [exposure]}


_LOGIN = {"required": ["authSecret"], "properties": {"authSecret": {
    "minLength": 1, "description": "A Route or Ingress needs a login: set ui.authSecret (or, for an Ingress whose "
                                   "annotations add one, ui.ingress.externalAuth: true)."}}}
