{{/*
Provider settings, as the operator's --mock-*, --aws-* and --gcp-* flags (the chart's tests start
the binary with the rendered arguments). AWS_REGION and GOOGLE_CLOUD_PROJECT are also set for the
SDKs' own credential and region discovery.
*/}}
{{- define "hawser.operator.providerArgs" -}}
{{- if eq .Values.provider "mock" }}
- --mock-address-pool={{ join "," .Values.mock.addressPool }}
{{- end }}
{{- if eq .Values.provider "aws" }}
{{- with .Values.aws.region }}
- --aws-region={{ . }}
{{- end }}
{{- with .Values.aws.vpcId }}
- --aws-vpc-id={{ . }}
{{- end }}
{{- end }}
{{- if eq .Values.provider "gcp" }}
{{- with .Values.gcp.project }}
- --gcp-project={{ . }}
{{- end }}
{{- with .Values.gcp.region }}
- --gcp-region={{ . }}
{{- end }}
{{- with .Values.gcp.network }}
- --gcp-network={{ . }}
{{- end }}
{{- with .Values.gcp.subnetwork }}
- --gcp-subnetwork={{ . }}
{{- end }}
{{- with .Values.gcp.nodeTags }}
- --gcp-node-tags={{ join "," . }}
{{- end }}
{{- with .Values.gcp.nodeServiceAccount }}
- --gcp-node-service-account={{ . }}
{{- end }}
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
