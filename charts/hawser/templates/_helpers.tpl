{{/* Chart name, truncated to fit label values. */}}
{{- define "hawser.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every object name; leaves room for the "-dataplane-metrics" suffix. */}}
{{- define "hawser.fullname" -}}
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

{{- define "hawser.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "hawser.labels" -}}
helm.sh/chart: {{ include "hawser.chart" . }}
app.kubernetes.io/name: {{ include "hawser.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: hawser
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "operator"). */}}
{{- define "hawser.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hawser.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "hawser.operator.fullname" -}}
{{- printf "%s-operator" (include "hawser.fullname" .) }}
{{- end }}

{{- define "hawser.dataplane.fullname" -}}
{{- printf "%s-dataplane" (include "hawser.fullname" .) }}
{{- end }}

{{- define "hawser.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "hawser.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "hawser.dataplane.serviceAccountName" -}}
{{- if .Values.dataplane.serviceAccount.create }}
{{- default (include "hawser.dataplane.fullname" .) .Values.dataplane.serviceAccount.name }}
{{- else }}
{{- required "dataplane.serviceAccount.name is required when dataplane.serviceAccount.create is false" .Values.dataplane.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest; the tag defaults to the chart appVersion. */}}
{{- define "hawser.image" -}}
{{- $image := .image }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default .ctx.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/* The ownership-tag cluster name (operator --cluster-name). */}}
{{- define "hawser.clusterName" -}}
{{- $name := .Values.clusterName }}
{{- if and (not $name) (eq .Values.provider "aws") }}
{{- $name = .Values.aws.clusterName }}
{{- end }}
{{- if and (not $name) (eq .Values.provider "mock") }}
{{- $name = .Release.Name }}
{{- end }}
{{- required (printf "clusterName is required with provider %s (for aws, aws.clusterName also serves): it names this cluster in the cloud resources' ownership tags" .Values.provider) $name }}
{{- end }}

{{/* Leader election is forced on with more than one replica: two leaders would fight over the cloud. */}}
{{- define "hawser.leaderElect" -}}
{{- if or .Values.operator.leaderElection.enabled (gt (int .Values.operator.replicas) 1) }}true{{ end }}
{{- end }}

{{/* Restricted securityContext shared by the operator container. */}}
{{- define "hawser.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}
