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

{{/* The server config file: the user's serverConfig plus what the chart owns. */}}
{{- define "infergate.serverConfig" -}}
{{- $owned := dict "model_repository" "/models" "host" "0.0.0.0" "port" (int .Values.service.port) }}
{{- toYaml (merge $owned (deepCopy .Values.serverConfig)) }}
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
