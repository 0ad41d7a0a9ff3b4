{{/*
The timing budget, as workerkit/timing evaluates it, for one pool or the scheduler.

The same symbols and rules as workerkit/timing/budget.py and workerkit/timing/rules/*.py
(docs/concepts/timing-budget.md): D = G - P - M; V defaults per engine (sql and rq 30,
celery 3600); H defaults to V / 3; Ip to J + 30. Only the rules that depend on values alone are
here; the others cannot be judged at render time and are left to the worker's own check at start:
  - T1 and C1-C6 need the app's tasks and Celery configuration;
  - S1 (SQLite only with one replica) needs the database URL, which is in a Secret.
The worker evaluates every rule again at start (and exits 2 on an error), with the same values:
this template only refuses earlier what would be refused then.

Errors fail the render; warnings (G3, V3, H1, I2, L4) fail it too when timing.strict, as the
worker refuses them then. Pools also get L1-L4 with the scheduler's defaults, as the worker's own
check applies them to every process (L4 reads G, P and M).

Arithmetic is sprig's addf/subf/mulf/divf (decimal, then float64), so a value exactly on a bound
that binary floating point cannot represent (0.1 + 0.2) may be judged differently from Python;
whole and half seconds are exact in both.

Tests: tests/chart/test_chart_timing.py compares the failing rule ids with
workerkit.timing.evaluate for every documented bad combination and for random budgets.
*/}}

{{/* A number as workerkit's messages show it: 30, 2.5, 0.333 (at most three decimals). */}}
{{- define "workerkit.num" -}}
{{- $x := float64 . -}}
{{- if eq $x (floor $x) -}}
{{- printf "%d" (int64 $x) -}}
{{- else -}}
{{- regexReplaceAll "0+$" (printf "%.3f" $x) "" | trimSuffix "." -}}
{{- end -}}
{{- end -}}

{{/*
The resolved symbols of a component (JSON): G P M D J V H F Ip R C L Rd Rp Sd Mg and strict.
Call with the resolved pool or scheduler (its engine and merged timing).
*/}}
{{- define "workerkit.timing.symbols" -}}
{{- $t := .timing -}}
{{- $engineV := dict "sql" 30.0 "rq" 30.0 "celery" 3600.0 -}}
{{- $g := float64 $t.gracePeriod -}}
{{- $p := float64 ($t.prestopDelay | default 0) -}}
{{- $m := float64 $t.releaseMargin -}}
{{- $j := float64 $t.jobTimeout -}}
{{- $v := float64 (ternary (index $engineV .engine) $t.visibilityTimeout (kindIs "invalid" $t.visibilityTimeout)) -}}
{{- $h := divf $v 3 -}}
{{- if not (kindIs "invalid" $t.heartbeatInterval) -}}{{- $h = float64 $t.heartbeatInterval -}}{{- end -}}
{{- $ip := addf $j 30 -}}
{{- if not (kindIs "invalid" $t.idempotencyInProgressExpiry) -}}{{- $ip = float64 $t.idempotencyInProgressExpiry -}}{{- end -}}
{{- $c := 0.0 -}}
{{- if eq .engine "celery" -}}{{- $c = float64 ($t.maxCountdown | default 0) -}}{{- end -}}
{{- $s := dict "G" $g "P" $p "M" $m "D" (subf $g $p $m) "J" $j "V" $v "H" $h -}}
{{- $_ := set $s "F" (float64 $t.checkpointInterval) -}}
{{- $_ := set $s "Ip" $ip -}}
{{- $_ := set $s "R" (float64 $t.idempotencyRetention) -}}
{{- $_ := set $s "C" $c -}}
{{- $_ := set $s "L" (float64 (ternary 15.0 $t.leaseDuration (kindIs "invalid" $t.leaseDuration))) -}}
{{- $_ := set $s "Rd" (float64 (ternary 10.0 $t.renewDeadline (kindIs "invalid" $t.renewDeadline))) -}}
{{- $_ := set $s "Rp" (float64 (ternary 2.0 $t.retryPeriod (kindIs "invalid" $t.retryPeriod))) -}}
{{- $_ := set $s "Sd" (float64 (ternary 0.5 $t.standbyDelay (kindIs "invalid" $t.standbyDelay))) -}}
{{- $_ := set $s "Mg" (float64 (ternary 2.0 $t.misfireGrace (kindIs "invalid" $t.misfireGrace))) -}}
{{- $_ := set $s "strict" (eq (toString $t.strict) "true") -}}
{{- toJson $s -}}
{{- end -}}

{{/*
Every value-only rule that concerns the engine, in workerkit's report order (JSON list of
{id, severity, title, ok, shown}). Titles are workerkit's Rule.title, verbatim.
*/}}
{{- define "workerkit.timing.findings" -}}
{{- $s := include "workerkit.timing.symbols" . | fromJson -}}
{{- $e := .engine -}}
{{- $g := $s.G -}}{{- $p := $s.P -}}{{- $m := $s.M -}}{{- $d := $s.D -}}{{- $j := $s.J -}}
{{- $v := $s.V -}}{{- $h := $s.H -}}{{- $f := $s.F -}}{{- $ip := $s.Ip -}}{{- $r := $s.R -}}
{{- $c := $s.C -}}
{{- $n := dict -}}
{{- range $k, $x := $s -}}{{- if ne $k "strict" -}}{{- $_ := set $n $k (include "workerkit.num" $x) -}}{{- end -}}{{- end -}}
{{- $run := addf $j $d $m -}}
{{- $unacked := addf $c $j $d $m -}}
{{- $v3limit := mulf 4 $unacked -}}
{{- if lt $v3limit 3600.0 -}}{{- $v3limit = 3600.0 -}}{{- end -}}
{{- $out := list -}}
{{- $out = append $out (dict "id" "G1" "severity" "error" "title" "P + D + M <= G with a drain window D > 0" "ok" (gt $d 0.0) "shown" (printf "G=%s, P=%s, M=%s, D=G-P-M=%s" $n.G $n.P $n.M $n.D)) -}}
{{- $out = append $out (dict "id" "G2" "severity" "error" "title" "P < G" "ok" (lt $p $g) "shown" (printf "P=%s, G=%s" $n.P $n.G)) -}}
{{- $out = append $out (dict "id" "G3" "severity" "warning" "title" "D >= 5" "ok" (ge $d 5.0) "shown" (printf "D=G-P-M=%s-%s-%s=%s" $n.G $n.P $n.M $n.D)) -}}
{{- $out = append $out (dict "id" "F1" "severity" "error" "title" "F <= D / 2" "ok" (le $f (divf $d 2)) "shown" (printf "F=%s, D=%s" $n.F $n.D)) -}}
{{- if eq $e "celery" -}}
{{- $out = append $out (dict "id" "V1" "severity" "error" "title" "V > J + D + M (celery)" "ok" (gt $v $run) "shown" (printf "V=%s, J=%s, D=%s, M=%s" $n.V $n.J $n.D $n.M)) -}}
{{- $out = append $out (dict "id" "V2" "severity" "error" "title" "V > countdown + J + D + M (celery)" "ok" (or (le $c 0.0) (gt $v $unacked)) "shown" (printf "V=%s, C=%s, J=%s, D=%s, M=%s" $n.V $n.C $n.J $n.D $n.M)) -}}
{{- $out = append $out (dict "id" "V3" "severity" "warning" "title" "V <= max(3600, 4 x (C + J + D + M))" "ok" (le $v $v3limit) "shown" (printf "V=%s, C=%s, J=%s, D=%s, M=%s" $n.V $n.C $n.J $n.D $n.M)) -}}
{{- end -}}
{{- if or (eq $e "sql") (eq $e "rq") -}}
{{- $out = append $out (dict "id" "H1" "severity" "warning" "title" "H <= V / 3 (extendable leases)" "ok" (le $h (divf $v 3)) "shown" (printf "H=%s, V=%s" $n.H $n.V)) -}}
{{- $out = append $out (dict "id" "H2" "severity" "error" "title" "H < V / 2 (extendable leases)" "ok" (lt $h (divf $v 2)) "shown" (printf "H=%s, V=%s" $n.H $n.V)) -}}
{{- end -}}
{{- $out = append $out (dict "id" "I1" "severity" "error" "title" "J < Ip" "ok" (lt $j $ip) "shown" (printf "J=%s, Ip=%s" $n.J $n.Ip)) -}}
{{- if eq $e "celery" -}}
{{- $out = append $out (dict "id" "I2" "severity" "warning" "title" "Ip <= V (celery)" "ok" (le $ip $v) "shown" (printf "Ip=%s, V=%s" $n.Ip $n.V)) -}}
{{- end -}}
{{- $out = append $out (dict "id" "I3" "severity" "error" "title" "R > max(V, Ip)" "ok" (gt $r (ternary $v $ip (ge $v $ip))) "shown" (printf "R=%s, V=%s, Ip=%s" $n.R $n.V $n.Ip)) -}}
{{- $out = append $out (dict "id" "L1" "severity" "error" "title" "Rd < L" "ok" (lt $s.Rd $s.L) "shown" (printf "Rd=%s, L=%s" $n.Rd $n.L)) -}}
{{- $out = append $out (dict "id" "L2" "severity" "error" "title" "1.2 x Rp < Rd" "ok" (lt (mulf 1.2 $s.Rp) $s.Rd) "shown" (printf "Rp=%s, Rd=%s" $n.Rp $n.Rd)) -}}
{{- $out = append $out (dict "id" "L3" "severity" "error" "title" "Sd < Mg" "ok" (lt $s.Sd $s.Mg) "shown" (printf "Sd=%s, Mg=%s" $n.Sd $n.Mg)) -}}
{{- $out = append $out (dict "id" "L4" "severity" "warning" "title" "Rp <= G - P - 0.2 M" "ok" (le $s.Rp (subf $g (addf $p (mulf 0.2 $m)))) "shown" (printf "Rp=%s, G=%s, P=%s, M=%s" $n.Rp $n.G $n.P $n.M)) -}}
{{- toJson (dict "strict" $s.strict "findings" $out) -}}
{{- end -}}

{{/*
Fail the render when the budget of a pool or the scheduler has errors (warnings too when strict):
one line per failed rule, `<where>: timing rule [ID] failed: <title> (<values>). Run ...`.
Call with the resolved pool or scheduler.
*/}}
{{- define "workerkit.timing.check" -}}
{{- $report := include "workerkit.timing.findings" . | fromJson -}}
{{- $lines := list -}}
{{- range $report.findings -}}
{{- if and (not .ok) (or (eq .severity "error") $report.strict) -}}
{{- $lines = append $lines (printf "timing rule [%s] failed: %s (%s)" .id .title .shown) -}}
{{- end -}}
{{- end -}}
{{- if $lines -}}
{{- $hint := printf "Run `workerkit check --engine %s` with these values for the fix." .engine -}}
{{- $msgs := list -}}
{{- range $lines -}}{{- $msgs = append $msgs (printf "%s: %s. %s" $.where . $hint) -}}{{- end -}}
{{- fail (join "\n" $msgs) -}}
{{- end -}}
{{- end -}}

{{/* The failed warnings of a component (not strict), one line each, for NOTES.txt. */}}
{{- define "workerkit.timing.warnings" -}}
{{- $report := include "workerkit.timing.findings" . | fromJson -}}
{{- range $report.findings -}}
{{- if and (not .ok) (eq .severity "warning") }}
  {{ $.where }}: timing rule [{{ .id }}] warns: {{ .title }} ({{ .shown }})
{{- end -}}
{{- end -}}
{{- end -}}
