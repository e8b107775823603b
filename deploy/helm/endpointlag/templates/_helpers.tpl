{{/* The chart's name: the app.kubernetes.io/name of the daemon's pods. */}}
{{- define "endpointlag.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 50 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object's name (kept short enough for the suffixes below). */}}
{{- define "endpointlag.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "endpointlag.aggregatorName" -}}
{{ include "endpointlag.fullname" . }}-aggregate
{{- end }}

{{- define "endpointlag.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride }}
{{- end }}

{{- define "endpointlag.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "endpointlag.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels of every object; the selectors' plus the version and, with helmLabels, Helm's. */}}
{{- define "endpointlag.commonLabels" -}}
app.kubernetes.io/part-of: endpointlag
{{- with .Chart.AppVersion }}
app.kubernetes.io/version: {{ . | quote }}
{{- end }}
{{- if .Values.helmLabels }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "endpointlag.selectorLabels" -}}
app.kubernetes.io/name: {{ include "endpointlag.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "endpointlag.labels" -}}
{{ include "endpointlag.selectorLabels" . }}
app.kubernetes.io/component: daemon
{{ include "endpointlag.commonLabels" . }}
{{- end }}

{{- define "endpointlag.aggregatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "endpointlag.name" . }}-aggregate
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "endpointlag.aggregatorLabels" -}}
{{ include "endpointlag.aggregatorSelectorLabels" . }}
app.kubernetes.io/component: aggregator
{{ include "endpointlag.commonLabels" . }}
{{- end }}

{{/* Labels of the cluster-wide and shared objects (RBAC, namespace, monitors). */}}
{{- define "endpointlag.baseLabels" -}}
{{ include "endpointlag.selectorLabels" . }}
{{ include "endpointlag.commonLabels" . }}
{{- end }}

{{/* repository@digest when a digest is set, else repository:tag (default: appVersion). */}}
{{- define "endpointlag.image" -}}
{{- $img := .Values.image }}
{{- if $img.digest }}
{{- if not (regexMatch "^sha256:[0-9a-f]{64}$" $img.digest) }}
{{- fail (printf "image.digest %q is not sha256:<64 hex digits>" $img.digest) }}
{{- end }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag | toString) }}
{{- end }}
{{- end }}

{{/* The aggregator's URL, as the daemons push to it. */}}
{{- define "endpointlag.aggregatorURL" -}}
{{- if .Values.aggregator.url }}{{ .Values.aggregator.url }}{{- else }}
{{- printf "%s://%s.%s.svc:%d" (ternary "https" "http" .Values.auth.enabled) (include "endpointlag.aggregatorName" .) (include "endpointlag.namespace" .) (int .Values.aggregator.port) }}
{{- end }}
{{- end }}

{{/* The OTEL_EXPORTER_OTLP_* variables, with otlp.enabled. */}}
{{- define "endpointlag.otlpEnv" -}}
{{- if .Values.otlp.enabled }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ required "otlp.endpoint is required when otlp.enabled" .Values.otlp.endpoint | quote }}
{{- if not (has .Values.otlp.protocol (list "grpc" "http/protobuf")) }}
{{- fail (printf "otlp.protocol %q: use grpc or http/protobuf" .Values.otlp.protocol) }}
{{- end }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ .Values.otlp.protocol | quote }}
{{- if .Values.otlp.insecure }}
- name: OTEL_EXPORTER_OTLP_INSECURE
  value: "true"
{{- end }}
{{- if .Values.otlp.headersSecret }}
- name: OTEL_EXPORTER_OTLP_HEADERS
  valueFrom:
    secretKeyRef:
      name: {{ required "otlp.headersSecret.name" .Values.otlp.headersSecret.name }}
      key: {{ required "otlp.headersSecret.key" .Values.otlp.headersSecret.key }}
{{- else if .Values.otlp.headers }}
{{- $h := list }}
{{- range $k, $v := .Values.otlp.headers }}
{{- $h = append $h (printf "%s=%s" $k (toString $v)) }}
{{- end }}
- name: OTEL_EXPORTER_OTLP_HEADERS
  value: {{ join "," $h | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Whether the ServiceAccount Prometheus runs as is bound to the metrics-reader role. */}}
{{- define "endpointlag.bindPrometheus" -}}
{{- if and .Values.auth.enabled .Values.rbac.create .Values.prometheus.serviceAccount.name (or (and .Values.serviceMonitor.enabled .Values.serviceMonitor.bearerTokenFile) .Values.prometheus.serviceAccount.bind) }}true{{ end }}
{{- end }}

{{- define "endpointlag.scraperName" -}}
{{ include "endpointlag.fullname" . }}-scraper
{{- end }}

{{/* The namespace of the scraper's token, when a monitor sends it (empty: none does). */}}
{{- define "endpointlag.scraperNamespace" -}}
{{- if .Values.auth.enabled }}
{{- $ns := include "endpointlag.namespace" . }}
{{- $pm := and .Values.podMonitor.enabled (default $ns .Values.podMonitor.namespace) }}
{{- $sm := and .Values.serviceMonitor.enabled (not .Values.serviceMonitor.bearerTokenFile) (default $ns .Values.serviceMonitor.namespace) }}
{{- if and $pm $sm (ne $pm $sm) }}
{{- fail "podMonitor.namespace and serviceMonitor.namespace differ, and both monitors send the scraper's token (serviceMonitor.bearerTokenFile is empty): put them in one namespace" }}
{{- end }}
{{- if $pm }}{{ $pm }}{{ else if $sm }}{{ $sm }}{{ end }}
{{- end }}
{{- end }}

{{/* What the ServiceMonitors and PodMonitors scrape, as a JSON list (fromJsonArray): the daemons
and, with aggregator.enabled, the aggregator. */}}
{{- define "endpointlag.monitorTargets" -}}
{{- $targets := list (dict "name" (include "endpointlag.fullname" .) "job" "endpointlag" "labels" (include "endpointlag.labels" .) "selector" (include "endpointlag.selectorLabels" .) "port" "metrics" "honorLabels" false) }}
{{- if .Values.aggregator.enabled }}
{{- $targets = append $targets (dict "name" (include "endpointlag.aggregatorName" .) "job" "endpointlag-aggregate" "labels" (include "endpointlag.aggregatorLabels" .) "selector" (include "endpointlag.aggregatorSelectorLabels" .) "port" "http" "honorLabels" true) }}
{{- end }}
{{- toJson $targets }}
{{- end }}

{{/* A ServiceMonitor or PodMonitor of one of endpointlag.monitorTargets. A dict: root (the
chart's context), kind, endpoints (the spec's key of the endpoint list), monitor (the values:
serviceMonitor or podMonitor), target, and bearerTokenFile (Prometheus's token file to send
instead of the scraper's token; empty: the scraper's). */}}
{{- define "endpointlag.monitor" -}}
{{- $root := .root }}
{{- $mon := .monitor }}
{{- $ns := include "endpointlag.namespace" $root }}
{{- $monNS := default $ns $mon.namespace }}
apiVersion: monitoring.coreos.com/v1
kind: {{ .kind }}
metadata:
  name: {{ .target.name }}
  namespace: {{ $monNS }}
  labels:
    {{- .target.labels | nindent 4 }}
    {{- with $mon.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- if ne $monNS $ns }}
  namespaceSelector:
    matchNames: [{{ $ns }}]
  {{- end }}
  selector:
    matchLabels:
      {{- .target.selector | nindent 6 }}
  {{ .endpoints }}:
  - port: {{ .target.port }}
    path: /metrics
    interval: {{ $mon.interval }}
    scrapeTimeout: {{ $mon.scrapeTimeout }}
    {{- if .target.honorLabels }}
    # The workload metrics' namespace label is the workload's, not the aggregator's.
    honorLabels: true
    {{- end }}
    {{- if $root.Values.auth.enabled }}
    scheme: https
    {{- if .bearerTokenFile }}
    bearerTokenFile: {{ .bearerTokenFile }}
    {{- else }}
    authorization:
      type: Bearer
      credentials:
        name: {{ include "endpointlag.scraperName" $root }}-token
        key: token
    {{- end }}
    {{- with $mon.tlsConfig }}
    tlsConfig:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- else }}
    scheme: http
    {{- end }}
    relabelings:
    - action: replace
      sourceLabels: [__meta_kubernetes_pod_node_name]
      targetLabel: node
    - action: replace
      replacement: {{ .target.job }}
      targetLabel: job
    {{- with $mon.relabelings }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- with $mon.metricRelabelings }}
    metricRelabelings:
      {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* A ClusterRoleBinding of one ServiceAccount to a ClusterRole. A dict: name, labels (YAML),
role, account and namespace (the ServiceAccount's). */}}
{{- define "endpointlag.clusterRoleBinding" -}}
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: {{ .name }}
  labels:
    {{- .labels | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: {{ .role }}
subjects:
- kind: ServiceAccount
  name: {{ .account }}
  namespace: {{ .namespace }}
{{- end }}
