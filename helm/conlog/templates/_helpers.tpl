{{/*
Helpers following Helm's conventions (`helm create`): names, the app.kubernetes.io/* labels,
and values derived from conlogd's configuration.
*/}}

{{/* The chart's name, or nameOverride. */}}
{{- define "conlog.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
A fully qualified name for the release's objects, at most 63 characters (DNS labels). The release
name alone when it already contains the chart's name.
*/}}
{{- define "conlog.fullname" -}}
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

{{/* Chart name and version, as used by the helm.sh/chart label. */}}
{{- define "conlog.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "conlog.labels" -}}
helm.sh/chart: {{ include "conlog.chart" . }}
{{ include "conlog.selectorLabels" . }}
app.kubernetes.io/component: daemon
app.kubernetes.io/part-of: conlog
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that select the daemon's pods; they never change across upgrades. */}}
{{- define "conlog.selectorLabels" -}}
app.kubernetes.io/name: {{ include "conlog.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The ServiceAccount's name. */}}
{{- define "conlog.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "conlog.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference: repository:tag, or repository@digest when a digest is given. */}}
{{- define "conlog.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
conlogd's configuration file. The values' `config` map, verbatim: conlogd refuses unknown keys,
so nothing else is ever added (TLS is mounted but not configured here until the daemon has TLS
keys, issue 6). A key set to null in a user's values file is dropped by Helm; `metrics: null`
means "no metrics endpoint", so it is put back as null rather than left to the daemon's default.
*/}}
{{- define "conlog.config" -}}
{{- $config := deepCopy .Values.config }}
{{- if not (hasKey $config "metrics") }}
{{- $_ := set $config "metrics" nil }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* The TCP port of the gRPC listener (the probes' port), from config.listen "HOST:PORT". */}}
{{- define "conlog.grpcPort" -}}
{{- .Values.config.listen | toString | splitList ":" | last | int }}
{{- end }}

{{/* The port of the metrics endpoint, or nothing when metrics are off. */}}
{{- define "conlog.metricsPort" -}}
{{- with .Values.config.metrics }}
{{- . | toString | splitList ":" | last | int }}
{{- end }}
{{- end }}

{{/*
Supplementary groups of the pod: the values' list, plus socket_group when it is a number, so that
conlogd may give conlogd.sock and fd.sock to that group without CAP_CHOWN.
*/}}
{{- define "conlog.supplementalGroups" -}}
{{- $groups := list }}
{{- range .Values.podSecurityContext.supplementalGroups }}
{{- $groups = append $groups (int64 .) }}
{{- end }}
{{- with .Values.config.socket_group }}
{{- if regexMatch "^[0-9]+$" (toString .) }}
{{- $groups = append $groups (int64 .) }}
{{- end }}
{{- end }}
{{- toYaml (uniq $groups) }}
{{- end }}
