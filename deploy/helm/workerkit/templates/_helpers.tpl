{{/*
Names, labels, the image, and each pool resolved with its defaults.
*/}}

{{- define "workerkit.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "workerkit.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
An object name: <fullname>-<suffix>, at most 63 characters. When too long, the fullname part is
shortened and a hash of the whole name keeps two long names apart.
Call with (dict "root" $ "suffix" "worker-emails").
*/}}
{{- define "workerkit.objectName" -}}
{{- $full := printf "%s-%s" (include "workerkit.fullname" .root) .suffix -}}
{{- if le (len $full) 63 -}}
{{- $full -}}
{{- else -}}
{{- printf "%s-%s" ($full | trunc 52 | trimSuffix "-") ($full | sha256sum | trunc 10) -}}
{{- end -}}
{{- end -}}

{{- define "workerkit.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The selector labels of a component: name, instance and component only. */}}
{{- define "workerkit.selectorLabels" -}}
app.kubernetes.io/name: {{ include "workerkit.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/*
Fail on a user label the chart sets itself (app.kubernetes.io/*, helm.sh/chart): it would be a
second key in the same map, and on a pod it could change the component a selector matches.
Call with (dict "where" "commonLabels" "labels" MAP).
*/}}
{{- define "workerkit.checkLabels" -}}
{{- range $key, $_ := .labels -}}
{{- if or (hasPrefix "app.kubernetes.io/" $key) (eq $key "helm.sh/chart") -}}
{{- fail (printf "%s has the label %q, which the chart sets itself (app.kubernetes.io/* and helm.sh/chart: name, instance, component... build the selectors); remove it from %s, or use a label of your own prefix" $.where $key $.where) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Every label of a component's objects. Call with (dict "root" $ "component" "worker-x"). */}}
{{- define "workerkit.labels" -}}
{{- include "workerkit.checkLabels" (dict "where" "commonLabels" "labels" .root.Values.commonLabels) -}}
{{ include "workerkit.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: workerkit
helm.sh/chart: {{ include "workerkit.chart" .root }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels for objects of the whole release (Service, monitors, rules, NetworkPolicy). */}}
{{- define "workerkit.releaseLabels" -}}
{{- include "workerkit.checkLabels" (dict "where" "commonLabels" "labels" .Values.commonLabels) -}}
app.kubernetes.io/name: {{ include "workerkit.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: workerkit
helm.sh/chart: {{ include "workerkit.chart" . }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Selects every pod of the release: the pools, the scheduler, and the migrations Job's pod too.
That pod is never scraped (its container has no port named http, the port the Service's
targetPort, the ServiceMonitor and the PodMonitor name), and the NetworkPolicy only limits its
ingress, which it does not need.
*/}}
{{- define "workerkit.releaseSelector" -}}
app.kubernetes.io/name: {{ include "workerkit.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "workerkit.image" -}}
{{- $img := .Values.image -}}
{{- if not $img.repository -}}
{{- fail "image.repository is empty: set it to your image (your app + workerkit, built from deploy/docker/Dockerfile), e.g. --set image.repository=registry.example.com/myapp" -}}
{{- end -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag | toString) -}}
{{- end -}}
{{- end -}}

{{- define "workerkit.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "workerkit.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
The defaults of a pool's keys (what values.yaml shows for workers.default). A pool given in the
user's values without some key takes it from here.
*/}}
{{- define "workerkit.poolDefaults" -}}
enabled: true
engine: sql
app: ""
queues: []
concurrency: 1
replicas: 2
timing: {}
resources: {}
env: []
envFrom: []
nodeSelector: {}
tolerations: []
affinity: {}
topologySpreadConstraints: []
podAnnotations: {}
podLabels: {}
strategy: {maxSurge: 1, maxUnavailable: 0}
pdb: {enabled: true, maxUnavailable: 1}
hpa: {enabled: false, minReplicas: 2, maxReplicas: 10, targetCPUUtilizationPercentage: 80}
keda:
  enabled: false
  minReplicaCount: 1
  maxReplicaCount: 10
  pollingInterval: 15
  cooldownPeriod: 300
  listLength: 10
  trigger: auto
  authenticationRef: ""
  databaseIndex: 0
  prometheus: {serverAddress: "", query: "", threshold: "10"}
{{- end -}}

{{/*
Merge (list DEFAULTS GIVEN) -> JSON: GIVEN's keys win, nested maps are merged the same way, a
null in GIVEN keeps the default. (sprig's merge and mergeOverwrite treat false and 0 as unset.)
*/}}
{{- define "workerkit.merge" -}}
{{- $out := deepCopy (index . 0 | default dict) -}}
{{- range $k, $v := (index . 1 | default dict) -}}
{{- $d := index $out $k -}}
{{- if and (kindIs "map" $v) (kindIs "map" $d) -}}
{{- $_ := set $out $k (include "workerkit.merge" (list $d $v) | fromJson) -}}
{{- else if not (kindIs "invalid" $v) -}}
{{- $_ := set $out $k $v -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/*
The enabled pools, resolved: a JSON object pool name -> pool with every key (defaults applied),
plus "name", "where" (workers.<pool>), "component" and "timing" (the top-level timing merged
under the pool's). Fails on a pool without an app, or with both hpa and keda.
*/}}
{{- define "workerkit.pools" -}}
{{- $root := . -}}
{{- $pools := dict -}}
{{- range $name, $given := .Values.workers -}}
{{- if $given -}}
{{- $pool := include "workerkit.merge" (list (fromYaml (include "workerkit.poolDefaults" $root)) $given) | fromJson -}}
{{- if $pool.enabled -}}
{{- $where := printf "workers.%s" $name -}}
{{- if not $pool.app -}}
{{- fail (printf "%s.app is empty: set it to the app the pool runs, as MODULE:ATTRIBUTE (celery: what `celery -A` takes), e.g. --set %s.app=proj.tasks:app" $where $where) -}}
{{- end -}}
{{- if and $pool.hpa.enabled $pool.keda.enabled -}}
{{- fail (printf "%s: %s.hpa.enabled and %s.keda.enabled are both true: two autoscalers would fight over the replica count; enable one of them" $where $where $where) -}}
{{- end -}}
{{- $_ := set $pool "name" $name -}}
{{- $_ := set $pool "where" $where -}}
{{- $_ := set $pool "component" (printf "worker-%s" $name) -}}
{{- $_ := set $pool "timing" (include "workerkit.merge" (list $root.Values.timing $pool.timing) | fromJson) -}}
{{- $_ := set $pools $name $pool -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson $pools -}}
{{- end -}}

{{/* The scheduler, resolved like a pool (JSON), or {} when disabled. */}}
{{- define "workerkit.scheduler" -}}
{{- $s := deepCopy .Values.scheduler -}}
{{- if $s.enabled -}}
{{- if not $s.app -}}
{{- fail "scheduler.app is empty: set it to the app whose schedules run, as MODULE:ATTRIBUTE, e.g. --set scheduler.app=proj.tasks:app" -}}
{{- end -}}
{{- $_ := set $s "name" "scheduler" -}}
{{- $_ := set $s "where" "scheduler" -}}
{{- $_ := set $s "component" "scheduler" -}}
{{- $_ := set $s "timing" (include "workerkit.merge" (list .Values.timing $s.timing) | fromJson) -}}
{{- toJson $s -}}
{{- else -}}
{{- "{}" -}}
{{- end -}}
{{- end -}}

{{/* Whether any enabled pool or the scheduler uses the sql engine: "true" or "". */}}
{{- define "workerkit.usesSql" -}}
{{- $sql := false -}}
{{- range $_, $pool := (include "workerkit.pools" . | fromJson) -}}
{{- if eq $pool.engine "sql" -}}{{- $sql = true -}}{{- end -}}
{{- end -}}
{{- if and .Values.scheduler.enabled (eq .Values.scheduler.engine "sql") -}}{{- $sql = true -}}{{- end -}}
{{- if $sql -}}true{{- end -}}
{{- end -}}

{{/*
The URL variable of an engine, from the existing Secret. Call with
(dict "root" $ "engine" "sql" "where" "workers.default").
*/}}
{{- define "workerkit.urlEnv" -}}
{{- $secrets := .root.Values.secrets -}}
{{- $var := ternary "WORKERKIT_DATABASE_URL" "WORKERKIT_REDIS_URL" (eq .engine "sql") -}}
{{- $key := ternary $secrets.databaseUrlKey $secrets.redisUrlKey (eq .engine "sql") -}}
{{- $keyName := ternary "secrets.databaseUrlKey" "secrets.redisUrlKey" (eq .engine "sql") -}}
{{- if not $secrets.existingSecret -}}
{{- fail (printf "secrets.existingSecret is empty, but %s (engine %s) needs %s: create a Secret with the URL under the key %q (%s) and set secrets.existingSecret to its name; the chart never takes a URL as a value" .where .engine $var $key $keyName) -}}
{{- end -}}
- name: {{ $var }}
  valueFrom:
    secretKeyRef:
      name: {{ $secrets.existingSecret }}
      key: {{ $key }}
{{- end -}}
