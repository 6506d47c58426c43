"""The chart's templates that say what ``kubetune render`` says, generated from render.py (``make schema``).

How: each render function runs once on a *symbolic* recipe, whose settings are markers (``⟦$k.image⟧``) instead
of values, and the object it returns is written out as Helm template YAML, each marker becoming the Helm
expression it names (``{{ toJson $k.image }}``). A setting that changes the object's shape rather than a value
(a queue adds a label and ``suspend``) is a :class:`Switch`: the function runs once more with it on, and what
differs is written inside ``{{- if CONDITION }}``. A list the code builds item by item is an ``each`` marker
(written as ``range``), a mapping merged in whole a ``splat`` marker.

A setting the function reads that is neither a plain value nor declared here stops the generator (see
:class:`Unmapped`) instead of being written as if it were constant, so render.py cannot change in a way that the
chart silently misses. tests/test_k8s_chart.py then holds `helm template` equal to `kubetune render` for every
scenario in charts/kubetune/ci/ (both sides of each switch among them).
"""

from __future__ import annotations

import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from kubetune.config import Recipe
from kubetune.k8s import render

MARK = re.compile(r"⟦([^⟧]*)⟧")
EACH, SPLAT = "each:", "splat:"


def mark(expression: str) -> str:
    """A marker standing for a Helm expression in a rendered object."""
    return f"⟦{expression}⟧"


class GeneratorError(Exception):
    """render.py does something the generator cannot write as a template."""


class Unmapped:
    """What a symbolic recipe holds for a setting that may be empty, None, false, a list or a mapping, unless a
    :class:`Switch` or an override gives it a value: any use of it (a test, iteration, text) stops the generator,
    since a marker there would be taken as always set."""

    def __init__(self, path: str):
        self._path = path

    def _refuse(self, *_: Any) -> Any:
        raise GeneratorError(f"render reads recipe.{self._path}, which kubetune.k8s.chartgen maps to no Helm value; "
                             "declare it (a Switch or an override) in the unit that renders it")

    __bool__ = __iter__ = __len__ = __contains__ = __getitem__ = __str__ = __eq__ = __int__ = _refuse
    __hash__ = None  # type: ignore[assignment]

    def __getattr__(self, name: str) -> Any:  # a section that is not mapped: recipe.metrics.enabled
        if name.startswith("__"):
            raise AttributeError(name)
        return Unmapped(f"{self._path}.{name}")._refuse()


@dataclass(frozen=True, eq=False)  # one switch is one condition: hashed by identity
class Switch:
    """A recipe setting that changes an object's shape: its value with the switch ``off`` and ``on``, and the Helm
    condition that is true where the user's value renders like ``on``."""

    path: str  # below the recipe, e.g. kubernetes.queue
    off: Any
    on: Any
    condition: str
    also: dict[str, Any] = field(default_factory=dict)  # other settings (path -> value) that hold while it is on


@dataclass(frozen=True)
class Unit:
    """One generated template: a render function applied to the symbolic recipe, and how its Helm text starts."""

    name: str  # the helper's name (a `define`), or "" for a whole template file
    source: str  # the render function(s) it is written from, named in the file's header
    build: Callable[[Recipe], Any]
    root: str  # the Helm expression of the chart's top context: $ in a file, $.ctx in most helpers
    switches: tuple[Switch, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)  # recipe path -> value (a marker, usually)
    raw: bool = False  # a helper that returns text (a name) rather than YAML
    prelude: str = ""  # hand-written checks included first
    when: Switch | None = None  # the object exists only with this on (render returns None with it off)


# ---- the symbolic recipe -------------------------------------------------------------------------------------
# the sections render reads, the variables that hold them, and the helpers (_helpers.tpl) that fill those
SECTIONS = {"run": "$r", "kubernetes": "$k", "resources": "$res"}
SECTION_HELPERS = {"$k": "kubetune.k", "$r": "kubetune.runSection", "$res": "kubetune.resources"}


def _model_of(annotation: Any) -> type[BaseModel] | None:
    candidates = [annotation, *typing.get_args(annotation)]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def _plain(annotation: Any) -> bool:
    """A str or number (or a choice of strings) that is always set: a marker can stand for it anywhere."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is typing.Literal:
        return all(isinstance(choice, str) for choice in typing.get_args(annotation))
    return annotation in (str, int, float)


def _symbolic(model: type[BaseModel], path: str, values: dict[str, Any]) -> BaseModel:
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        here = f"{path}.{name}"
        if here in values:
            fields[name] = values[here]
        elif (sub := _model_of(info.annotation)) is not None:
            fields[name] = _symbolic(sub, here, values) if _plain_section(info.annotation) else Unmapped(here)
        elif _plain(info.annotation):
            section, _, rest = here.partition(".")
            fields[name] = mark(f"{SECTIONS[section]}.{rest}")
        else:
            fields[name] = Unmapped(here)
    return model.model_construct(**fields)


def _plain_section(annotation: Any) -> bool:
    """A section that is always there (not ``X | None``): its settings get markers of their own."""
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


class _SymbolicRecipe(Recipe):
    def model_dump(self, **_: Any) -> dict[str, Any]:  # what recipe_sha256 hashes: one fixed document
        return {"symbolic": True}


def symbolic_recipe(values: dict[str, Any]) -> Recipe:
    sections = {name: _symbolic(_model_of(Recipe.model_fields[name].annotation), name, values)
                for name in SECTIONS}
    other = {name: Unmapped(name) for name in Recipe.model_fields if name not in sections}
    return _SymbolicRecipe.model_construct(**sections, **other)


def variants(unit: Unit) -> tuple[Any, dict[Switch, Any]]:
    """The unit's object with every switch off, and with each switch alone on."""
    def build(on: Switch | None, exists: bool = True) -> Any:
        values = dict(unit.overrides)
        values.update({s.path: s.off for s in unit.switches})  # several switches may share a path (MULTI_NODE)
        if on is not None:
            values.update({on.path: on.on, **on.also})
        if unit.when is not None:
            values[unit.when.path] = unit.when.on if exists else unit.when.off
        return unit.build(symbolic_recipe(values))
    if unit.when is not None and build(None, exists=False) is not None:
        raise GeneratorError(f"{unit.when.path}: declared to remove the object, but it is rendered without it too")
    return build(None), {s: build(s) for s in unit.switches}


# ---- writing Helm template text ------------------------------------------------------------------------------
class Writer:
    def __init__(self, literals: dict[str, str]):
        self.literals = literals  # a rendered value -> the Helm expression that makes it (the recipe's hash)

    def expression(self, value: Any) -> str | None:
        """The Helm expression for a value holding markers (or a known literal); None for a constant."""
        if isinstance(value, str) and value in self.literals:
            return self.literals[value]
        if not isinstance(value, str) or not MARK.search(value):
            return None
        whole = MARK.fullmatch(value)
        if whole:
            return whole.group(1)
        parts = MARK.split(value)  # literal, expression, literal, ...
        template = "".join(p.replace("%", "%%") if i % 2 == 0 else "%v" for i, p in enumerate(parts))
        return f"printf {json.dumps(template)} {' '.join(parts[1::2])}"

    def scalar(self, value: Any) -> str:
        expr = self.expression(value)
        return f"{{{{ toJson {_group(expr)} }}}}" if expr else json.dumps(value)

    def key(self, key: str) -> str:
        return key if re.fullmatch(r"[A-Za-z0-9_./-]+", key) and not MARK.search(key) else json.dumps(key)

    def mapping(self, off: dict, ons: dict[Switch, Any], indent: int) -> list[str]:
        pad, lines = " " * indent, []
        keys = list(dict.fromkeys([*off, *(k for on in ons.values() if isinstance(on, dict) for k in on)]))
        for key in keys:
            changed = {s: on.get(key, _ABSENT) for s, on in ons.items()
                       if on.get(key, _ABSENT) != off.get(key, _ABSENT)}
            splat = MARK.fullmatch(key)
            if splat and splat.group(1).startswith(SPLAT):
                source = splat.group(1).removeprefix(SPLAT)
                block = [f"{pad}{{{{- range $key, $value := {source} }}}}", f"{pad}{{{{ toJson $key }}}}: "
                         "{{ toJson $value }}", f"{pad}{{{{- end }}}}"]
                lines += self.conditional(block, changed, key, pad)
                continue
            if key not in off:
                (switch, value), = self.single(changed, key).items()
                lines += [f"{pad}{{{{- if {switch.condition} }}}}", *self.entry(key, value, {}, indent),
                          f"{pad}{{{{- end }}}}"]
            elif not changed:
                lines += self.entry(key, off[key], {}, indent)
            elif all(isinstance(v, dict) for v in changed.values()) and isinstance(off[key], dict):
                lines += self.entry(key, off[key], changed, indent)
            elif isinstance(off[key], list) and all(isinstance(v, list) and len(v) >= len(off[key])
                                                    for v in changed.values()):
                lines += self.entry(key, off[key], changed, indent)
            else:
                (switch, value), = self.single(changed, key).items()
                if value is _ABSENT:  # the switch takes the key away
                    lines += [f"{pad}{{{{- if not ({switch.condition}) }}}}", *self.entry(key, off[key], {}, indent),
                              f"{pad}{{{{- end }}}}"]
                    continue
                lines += [f"{pad}{{{{- if {switch.condition} }}}}", *self.entry(key, value, {}, indent),
                          f"{pad}{{{{- else }}}}", *self.entry(key, off[key], {}, indent), f"{pad}{{{{- end }}}}"]
        return lines

    def conditional(self, block: list[str], changed: dict, key: str, pad: str) -> list[str]:
        if not changed:
            return block
        (switch, _), = self.single(changed, key).items()
        return [f"{pad}{{{{- if {switch.condition} }}}}", *block, f"{pad}{{{{- end }}}}"]

    @staticmethod
    def single(changed: dict[Switch, Any], key: str) -> dict[Switch, Any]:
        if len(changed) != 1:
            raise GeneratorError(f"{key}: changed by {len(changed)} switches at once "
                                 f"({', '.join(s.path for s in changed)}); the generator writes one condition a key")
        return changed

    def sequence(self, off: list, ons: dict[Switch, Any], indent: int) -> list[str]:
        """``off``'s items (each changed in place by at most one switch), then the items a switch appends."""
        lines = []
        for i, item in enumerate(off):
            changed = {s: on[i] for s, on in ons.items() if on[i] != item}
            if changed and not (isinstance(item, dict) and all(isinstance(v, dict) for v in changed.values())):
                self.single(changed, f"item {i}")
                raise GeneratorError(f"item {i}: a switch replaces it; the generator changes mappings in place only")
            lines += self.item(item, indent, changed)
        for switch, on in ons.items():
            if len(on) == len(off):
                continue
            extra = [line for item in on[len(off):] for line in self.item(item, indent)]
            lines += [f"{' ' * indent}{{{{- if {switch.condition} }}}}", *extra, f"{' ' * indent}{{{{- end }}}}"]
        return lines

    def item(self, value: Any, indent: int, ons: dict[Switch, Any] | None = None) -> list[str]:
        pad = " " * indent
        text = json.dumps(value, ensure_ascii=False)
        each = [m for m in MARK.findall(text) if m.startswith(EACH)]
        if each:  # one item for each element of a list setting: `.` is that element
            source = each[0].removeprefix(EACH)
            value = json.loads(text.replace(mark(each[0]), mark(".")))
            return [f"{pad}{{{{- range {source} }}}}", *self.item(value, indent), f"{pad}{{{{- end }}}}"]
        if isinstance(value, dict) and value:
            inner = self.mapping(value, ons or {}, indent + 2)
            if inner[0].lstrip().startswith("{{-"):
                raise GeneratorError(f"{next(iter(value))}: the first key of a list item cannot be conditional")
            inner[0] = f"{pad}- {inner[0].lstrip()}"
            return inner
        return [f"{pad}- {self.scalar(value)}"]

    def entry(self, key: str, value: Any, ons: dict[Switch, Any], indent: int) -> list[str]:
        head = f"{' ' * indent}{self.key(key)}:"
        if isinstance(value, dict) and (value or ons):
            return [head, *self.mapping(value, ons, indent + 2)]
        if isinstance(value, list) and (value or ons):
            return [head, *self.sequence(value, ons, indent + 2)]
        if isinstance(value, (dict, list)):
            return [f"{head} {json.dumps(value)}"]
        return [f"{head} {self.scalar(value)}"]


_ABSENT = object()


def _group(expression: str) -> str:
    return expression if re.fullmatch(r"[$.\w]+", expression) else f"({expression})"


def _text(writer: Writer, off: Any, ons: dict[Switch, Any]) -> str:
    """A helper that returns text: the value itself, no quotes."""
    def plain(value: Any) -> str:
        expr = writer.expression(value)
        return f"{{{{- {expr} -}}}}" if expr else str(value)
    changed = {s: v for s, v in ons.items() if v != off}
    if not changed:
        return plain(off)
    (switch, on), = Writer.single(changed, "(text)").items()
    return f"{{{{- if {switch.condition} -}}}}\n{plain(on)}\n{{{{- else -}}}}\n{plain(off)}\n{{{{- end -}}}}"


def template(unit: Unit) -> str:
    """The unit as Helm template text (a `define` block for a helper)."""
    off, ons = variants(unit)
    symbolic = symbolic_recipe({})
    writer = Writer({render.recipe_sha256(symbolic): f'include "kubetune.recipeSha" {unit.root}',
                     render.recipe_text(symbolic): f'include "kubetune.recipeText" {unit.root}'})
    if unit.raw:
        body = _text(writer, off, ons)
    elif isinstance(off, list):  # several objects: one YAML document each
        body = "\n---\n".join("\n".join(writer.mapping(obj, {s: on[i] for s, on in ons.items()}, 0))
                               for i, obj in enumerate(off))
    else:
        body = "\n".join(writer.mapping(off, ons, 0))
    if unit.when is not None:
        body = f"{{{{- if {unit.when.condition} }}}}\n{body}\n{{{{- end }}}}"
    preamble = [unit.prelude] if unit.prelude else []
    for variable, helper in SECTION_HELPERS.items():
        if re.search(re.escape(variable) + r"[. )]", body):
            preamble.append(f'{{{{- {variable} := include "{helper}" {unit.root} | fromJson -}}}}')
    text = "\n".join([*preamble, body])
    return f'{{{{- define "{unit.name}" -}}}}\n{text}\n{{{{- end -}}}}' if unit.name else text


# ---- what is generated ---------------------------------------------------------------------------------------
QUEUE = Switch("kubernetes.queue", None, mark("$k.queue"), "$k.queue")
TTL = Switch("kubernetes.ttl_after_finished_s", None, mark("$k.ttl_after_finished_s"),
             'not (kindIs "invalid" $k.ttl_after_finished_s)')
PULL_SECRETS = Switch("kubernetes.image_pull_secrets", [], [mark(EACH + "$k.image_pull_secrets")],
                      "$k.image_pull_secrets")
PRIORITY_CLASS = Switch("kubernetes.priority_class_name", None, mark("$k.priority_class_name"),
                        "$k.priority_class_name")
FS_GROUP = Switch("kubernetes.fs_group", None, mark("$k.fs_group"), 'not (kindIs "invalid" $k.fs_group)')
POD_ANNOTATIONS = Switch("kubernetes.pod_annotations", {}, {mark(SPLAT + "$k.pod_annotations"): ""},
                         "$k.pod_annotations")
READS_CLAIM = Switch("kubernetes.pvc.access_modes", ["ReadWriteOnce"], ["ReadWriteMany"],
                     'has "ReadWriteMany" $k.pvc.access_modes')  # render.driver_reads_claim
CLAIM_NAME = Switch("kubernetes.pvc.claim_name", None, mark("$k.pvc.claim_name"), "$k.pvc.claim_name")
POD_LABELS = {"kubernetes.pod_labels": {mark(SPLAT + "$k.pod_labels"): ""}}
CHECK_POD_LABELS = '{{- include "kubetune.checkPodLabels" %s -}}'  # config's own-label rule (_helpers.tpl)

HELPERS = (
    Unit("kubetune.labels", "labels", lambda r: render.labels(r, mark("$.component")), root="$.ctx"),
    Unit("kubetune.metadata", "_meta", lambda r: render._meta(r, mark("$.name"), mark("$.ctx.Release.Namespace"),
                                                     mark("$.component")), root="$.ctx"),
    Unit("kubetune.podMetadata", "_pod_metadata", lambda r: render._pod_metadata(r, mark("$.component")), root="$.ctx",
         switches=(POD_ANNOTATIONS,), overrides=POD_LABELS, prelude=CHECK_POD_LABELS % "$.ctx"),
    Unit("kubetune.podSecurity", "pod_security", render.pod_security, root="$", switches=(FS_GROUP,)),
    Unit("kubetune.claimName", "claim_name", render.claim_name, root="$", switches=(CLAIM_NAME,), raw=True),
    Unit("kubetune.serviceAccountName", "Names.driver", lambda r: render.Names(r.run.name).driver, root="$", raw=True),
)
DRIVER_JOB = Unit(
    "", "driver_job", lambda r: render.driver_job(r, mark("$.Release.Namespace")), root="$",
    switches=(READS_CLAIM, QUEUE, TTL, PULL_SECRETS, PRIORITY_CLASS, FS_GROUP, POD_ANNOTATIONS),
    overrides={**POD_LABELS, "kubernetes.pvc.claim_name": mark('include "kubetune.claimName" $')},
    prelude='{{- include "kubetune.checkArtifacts" $ -}}\n{{- include "kubetune.checkGpus" $ -}}\n'
            + CHECK_POD_LABELS % "$")

# resources.finetune.nodes > 1: the driver also makes a TrainJob or a PyTorchJob (render.multi_node_rules)
MULTI_NODE = {kind: Switch("resources.finetune.nodes", 1, 2,
                           f'and (gt (int $res.finetune.nodes) 1) (eq $res.finetune.multi_node "{kind}")',
                           also={"resources.finetune.multi_node": kind})
              for kind in render.MULTI_NODE_RULES}
CREATE_CLAIM = Switch("kubernetes.pvc.create", False, True, "$k.pvc.create")
STORAGE_CLASS = Switch("kubernetes.pvc.storage_class", None, mark("$k.pvc.storage_class"), "$k.pvc.storage_class")
NAMESPACE = mark("$.Release.Namespace")
OBJECTS = {  # template file -> the render function it is written from
    "configmap.yaml": Unit("", "recipe_configmap", lambda r: render.recipe_configmap(r, NAMESPACE), root="$"),
    "pvc.yaml": Unit("", "claim", lambda r: render.claim(r, NAMESPACE), root="$", when=CREATE_CLAIM,
                     switches=(STORAGE_CLASS,),
                     overrides={"kubernetes.pvc.access_modes": [mark(EACH + "$k.pvc.access_modes")],
                                "kubernetes.pvc.claim_name": mark('include "kubetune.claimName" $')}),
    "rbac.yaml": Unit("", "driver_rbac", lambda r: render.driver_rbac(r, NAMESPACE), root="$",
                      switches=tuple(MULTI_NODE.values())),
}

HEADER = ("{{- /* Generated by `make schema` (python -m kubetune.k8s.generate) from kubetune.k8s.render.%s; "
          "do not edit. */ -}}\n")


def files() -> dict[str, str]:
    """Chart path -> the text it must hold."""
    templates = Path("charts/kubetune/templates")
    helpers = "\n\n".join(template(unit) for unit in HELPERS)
    out = {str(templates / "_render.tpl"): HEADER % ", ".join(unit.source for unit in HELPERS) + helpers + "\n"}
    for name, unit in {"driver-job.yaml": DRIVER_JOB, **OBJECTS}.items():
        out[str(templates / name)] = HEADER % unit.source + template(unit) + "\n"
    return out
