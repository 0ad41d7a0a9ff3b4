{{/*
The pod of a pool or of the scheduler: args, env (every timing value from the one merged timing
block), probes, grace period, preStop, security contexts and the /tmp emptyDir.
Each define takes (dict "root" $ "c" COMPONENT), COMPONENT being a resolved pool or scheduler.
*/}}

{{/*
A value as a WORKERKIT_* variable's text (and any number the chart writes into YAML or NOTES):
a whole number as a plain integer (Helm reads every number of the values as float64, whose
text is 1.2e+06 from a million on), other numbers in plain decimal, booleans as true/false.
*/}}
{{- define "workerkit.envValue" -}}
{{- if kindIs "bool" . -}}
{{- ternary "true" "false" . -}}
{{- else if or (kindIs "float64" .) (kindIs "float32" .) -}}
{{- if eq (float64 .) (floor (float64 .)) -}}
{{- printf "%d" (int64 .) -}}
{{- else if contains "e" (toString .) -}}
{{- regexReplaceAll "0+$" (printf "%f" .) "" -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{/* The container's args: the image's ENTRYPOINT is workerkit. */}}
{{- define "workerkit.args" -}}
{{- if eq .c.component "scheduler" -}}
{{- toJson (list "scheduler" .c.engine "--app" .c.app) -}}
{{- else -}}
{{- toJson (list "run" .c.engine "--app" .c.app) -}}
{{- end -}}
{{- end -}}

{{/* The chart's own env of a component (YAML list), in the contract's order. */}}
{{- define "workerkit.env" -}}
{{- $c := .c -}}
{{- $t := $c.timing -}}
{{- $v := .root.Values -}}
{{- $env := list -}}
{{- $always := list (list "GRACE_PERIOD" "gracePeriod") (list "PRESTOP_DELAY" "prestopDelay") (list "RELEASE_MARGIN" "releaseMargin") (list "JOB_TIMEOUT" "jobTimeout") (list "CHECKPOINT_INTERVAL" "checkpointInterval") (list "IDEMPOTENCY_RETENTION" "idempotencyRetention") -}}
{{- range $always -}}
{{- $env = append $env (dict "name" (printf "WORKERKIT_%s" (index . 0)) "value" (include "workerkit.envValue" (index $t (index . 1)))) -}}
{{- end -}}
{{- $optional := list (list "VISIBILITY_TIMEOUT" "visibilityTimeout") (list "HEARTBEAT_INTERVAL" "heartbeatInterval") (list "IDEMPOTENCY_IN_PROGRESS_EXPIRY" "idempotencyInProgressExpiry") -}}
{{- if eq $c.component "scheduler" -}}
{{- $optional = concat $optional (list (list "SCHEDULER_LEASE_DURATION" "leaseDuration") (list "SCHEDULER_RENEW_DEADLINE" "renewDeadline") (list "SCHEDULER_RETRY_PERIOD" "retryPeriod") (list "SCHEDULER_STANDBY_DELAY" "standbyDelay") (list "SCHEDULER_MISFIRE_GRACE" "misfireGrace") (list "SCHEDULER_RETENTION" "retention") (list "SCHEDULER_NAMESPACE" "namespace")) -}}
{{- end -}}
{{- range $optional -}}
{{- $x := index $t (index . 1) -}}
{{- if not (kindIs "invalid" $x) -}}
{{- $env = append $env (dict "name" (printf "WORKERKIT_%s" (index . 0)) "value" (include "workerkit.envValue" $x)) -}}
{{- end -}}
{{- end -}}
{{- if eq $c.engine "celery" -}}
{{- $env = append $env (dict "name" "WORKERKIT_MAX_COUNTDOWN" "value" (include "workerkit.envValue" ($t.maxCountdown | default 0))) -}}
{{- end -}}
{{- $env = append $env (dict "name" "WORKERKIT_STRICT" "value" (include "workerkit.envValue" (eq (toString $t.strict) "true"))) -}}
{{- $env = append $env (dict "name" "WORKERKIT_HTTP_PORT" "value" (include "workerkit.envValue" $v.probes.port)) -}}
{{- $env = append $env (dict "name" "WORKERKIT_LIVENESS_TIMEOUT" "value" (include "workerkit.envValue" $v.probes.livenessTimeout)) -}}
{{- $env = append $env (dict "name" "WORKERKIT_STARTUP_TIMEOUT" "value" (include "workerkit.envValue" $v.probes.startupTimeout)) -}}
{{- $env = append $env (dict "name" "WORKERKIT_LOG_FORMAT" "value" $v.logFormat) -}}
{{- $env = append $env (dict "name" "WORKERKIT_LOG_LEVEL" "value" $v.logLevel) -}}
{{- if ne $c.component "scheduler" -}}
{{- if $c.queues -}}
{{- $env = append $env (dict "name" "WORKERKIT_QUEUES" "value" (join "," $c.queues)) -}}
{{- end -}}
{{- if or (eq $c.engine "sql") (eq $c.engine "celery") -}}
{{- $env = append $env (dict "name" "WORKERKIT_CONCURRENCY" "value" (include "workerkit.envValue" $c.concurrency)) -}}
{{- end -}}
{{- end -}}
{{- if eq $c.engine "sql" -}}
{{- $env = append $env (dict "name" "WORKERKIT_REPLICAS" "value" (include "workerkit.replicasMax" $c)) -}}
{{- end -}}
{{- toYaml $env }}
{{ include "workerkit.urlEnv" (dict "root" .root "engine" $c.engine "where" $c.where) }}
- name: TMPDIR
  value: /tmp
{{- with $c.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The most replicas a component may run: its replicas, or its autoscaler's maximum. */}}
{{- define "workerkit.replicasMax" -}}
{{- if and .hpa .hpa.enabled -}}
{{- include "workerkit.envValue" .hpa.maxReplicas -}}
{{- else if and .keda .keda.enabled -}}
{{- include "workerkit.envValue" .keda.maxReplicaCount -}}
{{- else -}}
{{- include "workerkit.envValue" .replicas -}}
{{- end -}}
{{- end -}}

{{/* The pod's securityContext (JSON): the hardened defaults, podSecurityContext over them. */}}
{{- define "workerkit.podSecurityContext" -}}
{{- $hardened := dict "runAsNonRoot" true "runAsUser" 10001 "runAsGroup" 10001 "fsGroup" 10001 "seccompProfile" (dict "type" "RuntimeDefault") -}}
{{- include "workerkit.merge" (list $hardened .Values.podSecurityContext) -}}
{{- end -}}

{{/* A container's securityContext (JSON): the hardened defaults, securityContext over them. */}}
{{- define "workerkit.securityContext" -}}
{{- $hardened := dict "allowPrivilegeEscalation" false "readOnlyRootFilesystem" true "capabilities" (dict "drop" (list "ALL")) -}}
{{- include "workerkit.merge" (list $hardened .Values.securityContext) -}}
{{- end -}}

{{/* The pod template (metadata and spec) of a component. */}}
{{- define "workerkit.podTemplate" -}}
{{- $root := .root -}}
{{- $c := .c -}}
{{- $v := $root.Values -}}
{{- include "workerkit.timing.check" $c -}}
{{- $args := include "workerkit.args" . | fromJsonArray -}}
{{- $env := include "workerkit.env" . -}}
{{- $podSecurity := include "workerkit.podSecurityContext" $root | fromJson -}}
{{- $security := include "workerkit.securityContext" $root | fromJson -}}
{{- $grace := int64 (float64 $c.timing.gracePeriod) -}}
{{- $prestop := int64 (float64 ($c.timing.prestopDelay | default 0)) -}}
{{- $liveness := float64 $v.probes.livenessTimeout -}}
{{- $livePeriod := int64 (floor (divf $liveness 6)) -}}
{{- if lt $livePeriod 1 -}}{{- $livePeriod = 1 -}}{{- end -}}
{{- if gt $livePeriod 10 -}}{{- $livePeriod = 10 -}}{{- end -}}
{{- if and (gt $prestop 0) (semverCompare "<1.30.0-0" $root.Capabilities.KubeVersion.Version) -}}
{{- fail (printf "%s: timing.prestopDelay is %d (%s.timing.prestopDelay over timing.prestopDelay): the chart renders it as lifecycle.preStop.sleep, which needs Kubernetes 1.30 or later, and the cluster is %s (the sleep action is alpha and off before 1.30); set timing.prestopDelay to 0 on this cluster, or upgrade it to 1.30" $c.where $prestop $c.where $root.Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- $startupFailures := add (int64 (ceil (divf (float64 $v.probes.startupTimeout) 2))) 5 -}}
{{- $sa := include "workerkit.serviceAccountName" $root -}}
{{- include "workerkit.checkLabels" (dict "where" (printf "%s.podLabels" $c.where) "labels" $c.podLabels) -}}
metadata:
  labels:
    {{- include "workerkit.labels" (dict "root" $root "component" $c.component) | nindent 4 }}
    {{- with $c.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ toJson (dict "args" $args "env" ($env | fromYamlArray)) | sha256sum }}
    {{- with $c.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- if $sa }}
  serviceAccountName: {{ $sa }}
  {{- end }}
  automountServiceAccountToken: {{ $v.serviceAccount.automountToken }}
  # No <SERVICE>_SERVICE_HOST variables: a Service named workerkit-x would inject
  # WORKERKIT_X_SERVICE_HOST, which workerkit refuses as an unknown setting.
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ $grace }}
  securityContext:
    {{- toYaml $podSecurity | nindent 4 }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ ternary "scheduler" "worker" (eq $c.component "scheduler") }}
      image: {{ include "workerkit.image" $root | quote }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      args:
        {{- toYaml $args | nindent 8 }}
      env:
        {{- $env | nindent 8 }}
      {{- with $c.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      ports:
        - name: http
          containerPort: {{ include "workerkit.envValue" $v.probes.port }}
          protocol: TCP
      startupProbe:
        httpGet: {path: /startupz, port: http}
        periodSeconds: 2
        timeoutSeconds: 3
        failureThreshold: {{ $startupFailures }}
      livenessProbe:
        httpGet: {path: /livez, port: http}
        periodSeconds: {{ $livePeriod }}
        timeoutSeconds: 3
        failureThreshold: 3
      readinessProbe:
        httpGet: {path: /readyz, port: http}
        periodSeconds: 5
        timeoutSeconds: 3
        failureThreshold: 1
      {{- if gt $prestop 0 }}
      lifecycle:
        preStop:
          sleep:
            seconds: {{ $prestop }}
      {{- end }}
      {{- with $c.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $security | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
  volumes:
    - name: tmp
      emptyDir: {}
  {{- with $c.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $c.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $c.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $c.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
