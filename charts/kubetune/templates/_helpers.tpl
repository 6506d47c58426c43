{{/*
Helpers. The objects are named after recipe.run.name, not the release: `kubetune status <run>` and the driver
find them by that name, and `kubetune render` names them the same way. run.name is a DNS label of at most 40
characters (the recipe schema says so), so "<run>-recipe" and "<run>-driver" stay within the 63-character
limit of label values and object names; no truncation is needed.
*/}}

{{/* Everything Python shares with the chart: model defaults and rendering constants (make schema). */}}
{{- define "kubetune.generated" -}}
{{- .Files.Get "files/generated.json" -}}
{{- end -}}

{{/*
kubetune.merge: the user's section laid over the model's defaults, key by key, recursively for mappings.
hasKey (not mergeOverwrite) so that false, 0 and [] given by the user win over a default. Only sections (maps
with defaults inside) are merged key by key; a free-form mapping whose default is empty (node_selector,
pod_labels) is the user's whole. Returns JSON; use with fromJson.
*/}}
{{- define "kubetune.merge" -}}
{{- $out := dict -}}
{{- range $key, $default := .defaults -}}
{{- if hasKey $.user $key -}}
{{- $value := get $.user $key -}}
{{- if and (kindIs "map" $default) $default (kindIs "map" $value) -}}
{{- $_ := set $out $key (include "kubetune.merge" (dict "defaults" $default "user" $value) | fromJson) -}}
{{- else -}}
{{- $_ := set $out $key $value -}}
{{- end -}}
{{- else -}}
{{- $_ := set $out $key $default -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* recipe.kubernetes with defaults, as JSON. */}}
{{- define "kubetune.k" -}}
{{- $gen := include "kubetune.generated" . | fromJson -}}
{{- $user := .Values.recipe.kubernetes | default dict -}}
{{- include "kubetune.merge" (dict "defaults" $gen.defaults.kubernetes "user" $user) -}}
{{- end -}}

{{/* recipe.run with defaults, as JSON. */}}
{{- define "kubetune.runSection" -}}
{{- $gen := include "kubetune.generated" . | fromJson -}}
{{- include "kubetune.merge" (dict "defaults" $gen.defaults.run "user" (.Values.recipe.run | default dict)) -}}
{{- end -}}

{{- define "kubetune.run" -}}
{{- (include "kubetune.runSection" . | fromJson).name -}}
{{- end -}}

{{/* The recipe as the pods read it: Go's pretty JSON, byte-equal to kubetune.k8s.gojson (render.recipe_text). */}}
{{- define "kubetune.recipeText" -}}
{{- toPrettyJson .Values.recipe -}}
{{- end -}}

{{- define "kubetune.recipeSha" -}}
{{- include "kubetune.recipeText" . | sha256sum -}}
{{- end -}}

{{/*
Quoting: every value that comes from the recipe or the values reaches the output through `quote` or `toJson`,
never bare, so that no string (a newline, " #", ": ", a YAML indicator) can end a scalar early or add keys
(tests/test_k8s_chart_hostile.py feeds hostile strings through the chart and `kubetune render`). Not `toYaml`:
it writes a string holding U+2028 as a block scalar that go-yaml reads with a line break inside, which the
block's indentation (nindent) does not survive; Go's JSON escapes U+2028. toYaml is kept for generated values.
*/}}

{{/* Names, labels, pod metadata and security: _render.tpl, generated from kubetune.k8s.render (make schema). */}}

{{/* The recipe's own-label rule (config.KubernetesSection.pod_labels), which its schema cannot express. */}}
{{- define "kubetune.checkPodLabels" -}}
{{- $k := include "kubetune.k" . | fromJson -}}
{{- range $key, $_ := $k.pod_labels -}}
{{- if or (hasPrefix "app.kubernetes.io/" $key) (hasPrefix "kubetune.io/" $key) -}}
{{- fail (printf "recipe.kubernetes.pod_labels: %s: kubetune sets the app.kubernetes.io/ and kubetune.io/ labels itself" $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Refuse artifacts outside the claim (they would vanish with the pod), as kubetune render does. */}}
{{- define "kubetune.checkArtifacts" -}}
{{- $k := include "kubetune.k" . | fromJson -}}
{{- $root := (include "kubetune.runSection" . | fromJson).artifacts_root -}}
{{- if and (isAbs $root) (not (hasPrefix (printf "%s/" (trimSuffix "/" (clean $k.pvc.mount_path))) (printf "%s/" (clean $root)))) -}}
{{- fail (printf "recipe.run.artifacts_root: %s is outside recipe.kubernetes.pvc.mount_path (%s)" $root $k.pvc.mount_path) -}}
{{- end -}}
{{- end -}}

{{/* recipe.resources with defaults, as JSON (every stage's, resources.finetune's nodes and multi_node among them). */}}
{{- define "kubetune.resources" -}}
{{- include "kubetune.section" (dict "ctx" . "name" "resources") -}}
{{- end -}}

{{/* Refuse what kubetune validate and render refuse for several GPUs (config.Recipe._multi_gpu_problems,
     k8s/multinode.py): the driver would stop on it with exit 3 after `helm install`, before any GPU is asked for.
     generated.json's single_gpu_stages are the registry's stages without multi_process. */}}
{{- define "kubetune.checkGpus" -}}
{{- $gen := include "kubetune.generated" . | fromJson -}}
{{- $res := include "kubetune.resources" . | fromJson -}}
{{- $stages := dig "stages" $gen.stage_names (.Values.recipe | default dict) -}}
{{- range $stage := $gen.single_gpu_stages -}}
{{- if and (has $stage $stages) (gt (int (get $res $stage).gpus) 1) -}}
{{- fail (printf "recipe.resources.%s.gpus: %s runs on one GPU (it loads the model onto a single device), so more would sit idle; set 1, or 0 for the CPU" $stage $stage) -}}
{{- end -}}
{{- end -}}
{{- if and (gt (int $res.finetune.nodes) 1) (not (has "ReadWriteMany" (include "kubetune.k" . | fromJson).pvc.access_modes)) -}}
{{- fail "recipe.kubernetes.pvc.access_modes: resources.finetune.nodes > 1 mounts the claim on several nodes at once; it must be ReadWriteMany" -}}
{{- end -}}
{{- end -}}

{{/* recipe.<name> with the model's defaults, as JSON: call with (dict "ctx" $ "name" "serve"). */}}
{{- define "kubetune.section" -}}
{{- $gen := include "kubetune.generated" .ctx | fromJson -}}
{{- include "kubetune.merge" (dict "defaults" (get $gen.defaults .name) "user" (get .ctx.Values.recipe .name | default dict)) -}}
{{- end -}}

{{/*
The prompt template as vLLM's one-line Jinja chat template (system message = schema, user message = question):
kubetune.serving.chat_template, which writes its strings the way toJson does so that the two are equal.
*/}}
{{- define "kubetune.chatTemplate" -}}
{{- $parts := list "{%- set ns = namespace(context='', question='') -%}" "{%- for m in messages -%}{%- if m['role'] == 'system' -%}{%- set ns.context = m['content'] -%}" "{%- elif m['role'] == 'user' -%}{%- set ns.question = m['content'] -%}{%- endif -%}{%- endfor -%}" -}}
{{- $literal := "" -}}
{{- range regexFindAll "\\{\\{|\\}\\}|\\{(context|question)\\}|[^{}]+" . -1 -}}
{{- if eq . "{{" -}}
{{- $literal = print $literal "{" -}}
{{- else if eq . "}}" -}}
{{- $literal = print $literal "}" -}}
{{- else if or (eq . "{context}") (eq . "{question}") -}}
{{- if $literal }}{{ $parts = append $parts (printf "{{ %s }}" (toJson $literal)) }}{{ end -}}
{{- $literal = "" -}}
{{- $parts = append $parts (printf "{{ ns.%s | trim }}" (trimAll "{}" .)) -}}
{{- else -}}
{{- $literal = print $literal . -}}
{{- end -}}
{{- end -}}
{{- if $literal }}{{ $parts = append $parts (printf "{{ %s }}" (toJson $literal)) }}{{ end -}}
{{- join "" $parts -}}
{{- end -}}
