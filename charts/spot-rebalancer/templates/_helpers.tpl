{{/* Names, labels and the small pieces every template shares. */}}

{{- define "spot-rebalancer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object's name; "spot-rebalancer" for a release named so. */}}
{{- define "spot-rebalancer.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "spot-rebalancer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "spot-rebalancer.labels" -}}
helm.sh/chart: {{ include "spot-rebalancer.chart" . }}
app.kubernetes.io/name: {{ include "spot-rebalancer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one role: (dict "ctx" $ "role" "agent"). */}}
{{- define "spot-rebalancer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spot-rebalancer.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .role }}
{{- end }}

{{- define "spot-rebalancer.roleLabels" -}}
{{ include "spot-rebalancer.labels" .ctx }}
app.kubernetes.io/component: {{ .role }}
{{- end }}

{{/* The ServiceAccount name of one role: (dict "ctx" $ "role" "agent"). */}}
{{- define "spot-rebalancer.serviceAccountName" -}}
{{- $sa := index .ctx.Values .role "serviceAccount" }}
{{- default (printf "%s-%s" (include "spot-rebalancer.fullname" .ctx) .role) $sa.name }}
{{- end }}

{{/* The agent's namespace: `agent.namespace`, default `<release namespace>-agent`. The agent runs on
the host network, which only the `privileged` Pod Security level allows; alone in its namespace, it
leaves the release namespace free to enforce `restricted`. */}}
{{- define "spot-rebalancer.agentNamespace" -}}
{{- default (printf "%s-agent" .Release.Namespace) .Values.agent.namespace.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The namespace of one role: (dict "ctx" $ "role" "agent"). */}}
{{- define "spot-rebalancer.roleNamespace" -}}
{{- if eq .role "agent" }}
{{- include "spot-rebalancer.agentNamespace" .ctx }}
{{- else }}
{{- .ctx.Release.Namespace }}
{{- end }}
{{- end }}

{{/* The username a role's ServiceAccount authenticates as. */}}
{{- define "spot-rebalancer.serviceAccountUsername" -}}
{{- printf "system:serviceaccount:%s:%s" (include "spot-rebalancer.roleNamespace" .) (include "spot-rebalancer.serviceAccountName" .) }}
{{- end }}

{{- define "spot-rebalancer.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The opt-in label as KEY=VALUE (the --opt-in-label flag of the controller and the webhook). */}}
{{- define "spot-rebalancer.optInLabel" -}}
{{- printf "%s=%s" .Values.optInLabel.key .Values.optInLabel.value }}
{{- end }}

{{- define "spot-rebalancer.webhookServiceName" -}}
{{- printf "%s-webhook" (include "spot-rebalancer.fullname" .) }}
{{- end }}

{{- define "spot-rebalancer.webhookCertificateName" -}}
{{- printf "%s-webhook" (include "spot-rebalancer.fullname" .) }}
{{- end }}

{{- define "spot-rebalancer.webhookTlsSecretName" -}}
{{- if .Values.webhook.tls.certManager.enabled }}
{{- printf "%s-webhook-tls" (include "spot-rebalancer.fullname" .) }}
{{- else }}
{{- required "webhook.tls.existingSecret is required when webhook.tls.certManager.enabled is false" .Values.webhook.tls.existingSecret }}
{{- end }}
{{- end }}

{{/* The container security context every role runs with. */}}
{{- define "spot-rebalancer.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext }}
{{- end }}

{{/* Logging environment shared by every role. */}}
{{- define "spot-rebalancer.logEnv" -}}
- name: LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
{{- end }}
