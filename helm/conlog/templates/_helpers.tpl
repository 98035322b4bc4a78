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
Where the TLS Secret, and a separate client CA Secret, are mounted: beside /etc/conlog, never
inside it (the ConfigMap volume there is read-only, so no mount point can be made in it).
*/}}
{{- define "conlog.tlsDir" -}}/etc/conlog-tls{{- end }}
{{- define "conlog.clientCADir" -}}/etc/conlog-client-ca{{- end }}

{{/*
conlogd's configuration file: the values' `config` map, with every key conlogd has and nothing
else (it refuses unknown keys). Two keys are the chart's: `tls` is null unless `tls.enabled`
(whose Secret holds the files), and its `client_ca` follows `tls.mutual`. A key set to null in a
user's values file is dropped by Helm; `metrics: null` means "no metrics endpoint", so it is put
back as null rather than left to the daemon's default. Settings that would keep conlogd from
starting, or the probes from reaching it, fail here with a message instead.
*/}}
{{- define "conlog.config" -}}
{{- $config := deepCopy .Values.config }}
{{- if not (hasKey $config "metrics") }}
{{- $_ := set $config "metrics" nil }}
{{- end }}
{{- if not $config.health }}
{{- fail "config.health is required: the kubelet's gRPC probes cannot speak TLS, so they go to this plaintext health-only listener (e.g. 0.0.0.0:7772)" }}
{{- end }}
{{- if .Values.tls.enabled }}
{{- $tls := deepCopy (required "tls.enabled needs config.tls (cert and key)" $config.tls) }}
{{- $dir := include "conlog.tlsDir" . }}
{{- range $key := list "cert" "key" }}
{{- if not (hasPrefix (printf "%s/" $dir) (toString (get $tls $key))) }}
{{- fail (printf "config.tls.%s must be a file of the TLS Secret, mounted at %s (got %v)" $key $dir (get $tls $key)) }}
{{- end }}
{{- end }}
{{- if get $tls "client_ca" }}
{{- fail "config.tls.client_ca is set by the chart: use tls.mutual (and tls.clientCASecretName)" }}
{{- end }}
{{- if .Values.tls.mutual }}
{{- $caDir := ternary (include "conlog.clientCADir" .) $dir (ne .Values.tls.clientCASecretName "") }}
{{- $_ := set $tls "client_ca" (printf "%s/ca.crt" $caDir) }}
{{- else }}
{{- $_ := set $tls "client_ca" nil }}
{{- end }}
{{- if not (hasKey $tls "handshake_timeout") }}
{{- $_ := set $tls "handshake_timeout" "10s" }}
{{- end }}
{{- $_ := set $config "tls" $tls }}
{{- else }}
{{- $_ := set $config "tls" nil }}
{{- $listen := toString $config.listen }}
{{- if not (or $config.insecure (hasPrefix "127." $listen) (hasPrefix "[::1]:" $listen)) }}
{{- fail (printf "config.listen %s is not loopback and tls.enabled is false: enable TLS, or set config.insecure: true for a plaintext demo" $listen) }}
{{- end }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* The TCP port of the Console listener, from config.listen "HOST:PORT". */}}
{{- define "conlog.grpcPort" -}}
{{- .Values.config.listen | toString | splitList ":" | last | int }}
{{- end }}

{{/* The port of the health listener (the probes' port), from config.health "HOST:PORT". */}}
{{- define "conlog.healthPort" -}}
{{- .Values.config.health | toString | splitList ":" | last | int }}
{{- end }}

{{/* The port of the metrics endpoint, or nothing when metrics are off. */}}
{{- define "conlog.metricsPort" -}}
{{- with .Values.config.metrics }}
{{- . | toString | splitList ":" | last | int }}
{{- end }}
{{- end }}

{{/*
Supplementary groups of the pod: the values' list, plus socket_group and consoles.socket_group
when they are numbers, so that conlogd may give conlogd.sock and fd.sock, and the guest sockets,
to those groups without CAP_CHOWN.
*/}}
{{- define "conlog.supplementalGroups" -}}
{{- $groups := list }}
{{- range .Values.podSecurityContext.supplementalGroups }}
{{- $groups = append $groups (int64 .) }}
{{- end }}
{{- range list .Values.config.socket_group (.Values.config.consoles | default dict).socket_group }}
{{- if and . (regexMatch "^[0-9]+$" (toString .)) }}
{{- $groups = append $groups (int64 .) }}
{{- end }}
{{- end }}
{{- toYaml (uniq $groups) }}
{{- end }}

{{/* Labels that select conlog-gateway's pods (docs/gateway.md). */}}
{{- define "conlog.gatewaySelectorLabels" -}}
app.kubernetes.io/name: {{ include "conlog.name" . }}-gateway
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every conlog-gateway object. */}}
{{- define "conlog.gatewayLabels" -}}
helm.sh/chart: {{ include "conlog.chart" . }}
{{ include "conlog.gatewaySelectorLabels" . }}
app.kubernetes.io/component: gateway
app.kubernetes.io/part-of: conlog
app.kubernetes.io/version: {{ .Values.gateway.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* conlog-gateway's image reference. */}}
{{- define "conlog.gatewayImage" -}}
{{- if .Values.gateway.image.digest }}
{{- printf "%s@%s" .Values.gateway.image.repository .Values.gateway.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.gateway.image.repository (.Values.gateway.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}
