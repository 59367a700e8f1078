{{/* The chart name. */}}
{{- define "herald.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The full name: the prefix of every resource's name. */}}
{{- define "herald.fullname" -}}
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

{{/* Labels on every resource. */}}
{{- define "herald.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "herald.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: herald
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels selecting the release's pods (all roles). */}}
{{- define "herald.selectorLabels" -}}
app.kubernetes.io/name: {{ include "herald.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The roles, in order. */}}
{{- define "herald.roles" -}}
ingest processor activator
{{- end }}

{{/* The image reference every Deployment runs. */}}
{{- define "herald.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "herald.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "herald.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Secret names: the chart's own unless an existing one is named. */}}
{{- define "herald.controlTokenSecret" -}}
{{- default (printf "%s-control-token" (include "herald.fullname" .)) .Values.controlToken.existingSecret }}
{{- end }}
{{- define "herald.natsAuthSecret" -}}
{{- default (printf "%s-nats-auth" (include "herald.fullname" .)) .Values.nats.auth.existingSecret }}
{{- end }}
{{- define "herald.natsTlsSecret" -}}
{{- default (printf "%s-nats-tls" (include "herald.fullname" .)) .Values.nats.tls.existingSecret }}
{{- end }}

{{/* Where secrets are mounted in the containers. */}}
{{- define "herald.controlTokenDir" -}}/var/run/secrets/herald/control{{- end }}
{{- define "herald.natsCredsDir" -}}/var/run/secrets/herald/nats-creds{{- end }}
{{- define "herald.natsTlsDir" -}}/var/run/secrets/herald/nats-tls{{- end }}

{{/*
The whole configuration as a dict: the user's `config` with what the chart owns set on top
(listen addresses, NATS connection, control token file, shutdown timeouts).
*/}}
{{- define "herald.configDict" -}}
{{- $cfg := deepCopy (default (dict) .Values.config) }}
{{- $nats := default (dict) (get $cfg "nats") }}
{{- $_ := set $nats "servers" .Values.nats.url }}
{{- $_ := set $nats "request_timeout_ms" (int .Values.nats.requestTimeoutMs) }}
{{- $auth := .Values.nats.auth }}
{{- if eq $auth.method "userPassword" }}
{{- $_ := set $nats "user" $auth.user }}
{{- else if eq $auth.method "credsFile" }}
{{- $_ := set $nats "creds_file" (printf "%s/nats.creds" (include "herald.natsCredsDir" .)) }}
{{- end }}
{{- if .Values.nats.tls.enabled }}
{{- $_ := set $nats "tls_required" true }}
{{- $_ := set $nats "tls_ca_file" (printf "%s/ca.crt" (include "herald.natsTlsDir" .)) }}
{{- if .Values.nats.tls.clientCert }}
{{- $_ := set $nats "tls_cert_file" (printf "%s/tls.crt" (include "herald.natsTlsDir" .)) }}
{{- $_ := set $nats "tls_key_file" (printf "%s/tls.key" (include "herald.natsTlsDir" .)) }}
{{- end }}
{{- end }}
{{- $_ := set $cfg "nats" $nats }}
{{- $control := default (dict) (get $cfg "control") }}
{{- $_ := set $control "token_file" (printf "%s/token" (include "herald.controlTokenDir" .)) }}
{{- $_ := set $cfg "control" $control }}
{{- range $role := splitList " " (include "herald.roles" .) }}
{{- $v := get $.Values $role }}
{{- $sec := default (dict) (get $cfg $role) }}
{{- if hasKey $v.ports "http" }}
{{- $_ := set $sec "http_addr" (printf "0.0.0.0:%d" (int $v.ports.http)) }}
{{- end }}
{{- $_ := set $sec "grpc_addr" (printf "0.0.0.0:%d" (int $v.ports.grpc)) }}
{{- $_ := set $sec "admin_addr" (printf "0.0.0.0:%d" (int $v.ports.admin)) }}
{{- $_ := set $sec "shutdown_timeout_seconds" (int $v.shutdownTimeoutSeconds) }}
{{- $_ := set $cfg $role $sec }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* A TOML key: bare when it can be, quoted otherwise. */}}
{{- define "herald.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/* A TOML value: inline tables and arrays recursively; scalars as JSON (valid TOML for
strings, numbers and booleans; whole numbers print without a fraction). */}}
{{- define "herald.toml.value" -}}
{{- if kindIs "map" . -}}
{ {{- $first := true }}{{ range $k, $v := . }}{{ if not (kindIs "invalid" $v) }}{{ if not $first }}, {{ else }} {{ end }}{{ $first = false }}{{ include "herald.toml.key" $k }} = {{ include "herald.toml.value" $v }}{{ end }}{{ end }} }
{{- else if kindIs "slice" . -}}
[{{ range $i, $v := . }}{{ if $i }}, {{ end }}{{ include "herald.toml.value" $v }}{{ end }}]
{{- else if and (kindIs "float64" .) (eq (float64 (int64 .)) .) -}}
{{ int64 . }}
{{- else -}}
{{ toJson . }}
{{- end }}
{{- end }}

{{/* Is this value a list of tables (rendered as [[name]])? */}}
{{- define "herald.toml.isTableList" -}}
{{- if and (kindIs "slice" .) (gt (len .) 0) }}{{ if kindIs "map" (first .) }}true{{ end }}{{ end }}
{{- end }}

{{/* A TOML table: its plain keys first, then its sub-tables and lists of tables. */}}
{{- define "herald.toml.table" -}}
{{- $path := .path }}
{{- $t := .table }}
{{- if $path }}
{{ printf "[%s]" $path }}
{{- end }}
{{- range $k, $v := $t }}
{{- if and (not (kindIs "invalid" $v)) (not (kindIs "map" $v)) (not (include "herald.toml.isTableList" $v)) }}
{{ include "herald.toml.key" $k }} = {{ include "herald.toml.value" $v }}
{{- end }}
{{- end }}
{{- range $k, $v := $t }}
{{- $sub := include "herald.toml.key" $k }}
{{- if $path }}{{ $sub = printf "%s.%s" $path $sub }}{{ end }}
{{- if kindIs "map" $v }}
{{ include "herald.toml.table" (dict "path" $sub "table" $v) }}
{{- else if include "herald.toml.isTableList" $v }}
{{- range $item := $v }}

{{ printf "[[%s]]" $sub }}
{{- range $ik, $iv := $item }}
{{- if not (kindIs "invalid" $iv) }}
{{ include "herald.toml.key" $ik }} = {{ include "herald.toml.value" $iv }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The TOML file every service reads. */}}
{{- define "herald.configToml" -}}
# Rendered by the Herald chart from .Values.config; see docs/operations.md "Configuration".
{{- include "herald.toml.table" (dict "path" "" "table" (include "herald.configDict" . | fromYaml)) }}
{{- end }}
