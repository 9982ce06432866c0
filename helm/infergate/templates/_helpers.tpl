{{/* Names, labels and derived values shared by the templates. */}}

{{- define "infergate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "infergate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "infergate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "infergate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "infergate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "infergate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The metrics Service: Prometheus labels what it scrapes through it service="<this name>". */}}
{{- define "infergate.metricsServiceName" -}}
{{- printf "%s-metrics" (include "infergate.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{- define "infergate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "infergate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "infergate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* "true" when the server config turns TLS on (NOTES.txt shows how to call it). */}}
{{- define "infergate.tls" -}}
{{- if .Values.serverConfig.tls }}true{{ end }}
{{- end }}

{{/* The port the kubelet's gRPC probes connect to: always the plaintext health port, never the serving
     port. There the probes would share gRPC's pending-call backlog (limits.max_pending_calls) with every
     call, and a traffic spike would fail them and take the pods out of the Service; with TLS the kubelet
     could not speak to it at all. */}}
{{- define "infergate.probePort" -}}
{{- .Values.probes.healthPort }}
{{- end }}

{{/* The server config file: the user's serverConfig plus what the chart owns (the chart's keys win).
     Metrics listen on every address so Prometheus can scrape the pod; grpc.health.v1 is also served
     alone, in plaintext, on probes.healthPort (its address, the pod IP, comes as --health-host). With
     --workers every worker shares that fixed port, as they share the serving port. */}}
{{- define "infergate.serverConfig" -}}
{{- $owned := dict "model_repository" "/models" "host" .Values.listenAddress "port" (int .Values.service.port) "health_port" (int .Values.probes.healthPort) }}
{{- if .Values.metrics.enabled }}
{{- $_ := set $owned "telemetry" (dict "metrics_host" .Values.listenAddress) }}
{{- end }}
{{- $config := deepCopy .Values.serverConfig }}
{{- include "infergate.serverFloats" $config }}
{{- toYaml (merge $owned $config) }}
{{- end }}

{{/* The server config's float fields (ServerConfig's; tests/test_chart_values.py keeps the list whole).
     Helm's --set types integers, booleans and null but keeps a fraction as text: with
     --set serverConfig.telemetry.sample_ratio=0.5 the value is the string "0.5", which toYaml writes
     quoted and the server refuses (it coerces nothing). Here such a string, in one of these fields and
     spelling a decimal number, becomes that number; anything else is left for the server to refuse.
     Given the config (a copy: it is changed in place). */}}
{{- define "infergate.serverFloats" -}}
{{- $config := . }}
{{- range $path := list "shutdown_grace_seconds" "shutdown_delay_seconds" "repository_poll_seconds" "telemetry.sample_ratio" "auth.leeway_seconds" "auth.jwks.refresh_seconds" "auth.jwks.min_refresh_seconds" "auth.jwks.fetch_timeout_seconds" "connections.max_age_seconds" "connections.max_age_grace_seconds" "connections.max_idle_seconds" "connections.keepalive_time_seconds" "connections.keepalive_timeout_seconds" }}
{{- $keys := splitList "." $path }}
{{- $parent := $config }}
{{- range $key := initial $keys }}
{{- $parent = and (kindIs "map" $parent) (get $parent $key) }}
{{- end }}
{{- $value := and (kindIs "map" $parent) (get $parent (last $keys)) }}
{{- if and (kindIs "string" $value) (regexMatch "^[+-]?([0-9]+[.]?[0-9]*|[.][0-9]+)([eE][+-]?[0-9]+)?$" $value) }}
{{- $number := float64 $value }}
{{- /* float64 gives 0 for text it cannot hold (1e400): only a zero spelled so becomes 0 */}}
{{- if or (ne $number 0.0) (regexMatch "^[+-]?(0+[.]?0*|[.]0+)([eE][+-]?[0-9]+)?$" $value) }}
{{- $_ := set $parent (last $keys) $number }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* What the server spends after SIGTERM: shutdown delay + drain (its defaults: 0 and 30 s). */}}
{{- define "infergate.drainSeconds" -}}
{{- $delay := 0 }}
{{- if hasKey .Values.serverConfig "shutdown_delay_seconds" }}{{ $delay = .Values.serverConfig.shutdown_delay_seconds }}{{ end }}
{{- $grace := 30 }}
{{- if hasKey .Values.serverConfig "shutdown_grace_seconds" }}{{ $grace = .Values.serverConfig.shutdown_grace_seconds }}{{ end }}
{{- addf $delay $grace | ceil | int }}
{{- end }}

{{/* preStop sleep + delay + drain + 15 s for the batchers to finish and the process to exit. */}}
{{- define "infergate.terminationGracePeriodSeconds" -}}
{{- add .Values.preStopSleepSeconds (include "infergate.drainSeconds" . | int) 15 }}
{{- end }}
