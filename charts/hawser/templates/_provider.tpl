{{/*
Provider settings the operator binary accepts as flags. Only flags that exist in this version of
hawser-operator are rendered (the chart's tests start the binary with the rendered arguments); a
value with no flag yet is still accepted and documented, and reaches the operator through the
standard SDK environment variables where one exists (AWS_REGION, GOOGLE_CLOUD_PROJECT).
*/}}
{{- define "hawser.operator.providerArgs" -}}
{{- if eq .Values.provider "mock" }}
- --mock-address-pool={{ join "," .Values.mock.addressPool }}
{{- end }}
{{- end }}

{{- define "hawser.operator.providerEnv" -}}
{{- if and (eq .Values.provider "aws") .Values.aws.region }}
- name: AWS_REGION
  value: {{ .Values.aws.region | quote }}
{{- end }}
{{- if and (eq .Values.provider "gcp") .Values.gcp.project }}
- name: GOOGLE_CLOUD_PROJECT
  value: {{ .Values.gcp.project | quote }}
{{- end }}
{{- end }}
