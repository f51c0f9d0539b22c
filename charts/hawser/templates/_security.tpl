{{/*
Security-scanner (checkov) findings this chart does not follow, each with its reason. The chart's
tests (charts/hawser/tests/test_security.py) enforce every other check, and fail if a check is
skipped here without a reason or the list changes without the test knowing.
*/}}
{{- define "hawser.commonSecurityScanSkips" -}}
checkov.io/skip1: "CKV_K8S_11=No CPU limit on purpose, since CFS throttling delays reconciles and health answers; requests reserve CPU and the memory limit bounds the pod"
checkov.io/skip2: "CKV_K8S_15=IfNotPresent is correct for immutable release tags; set image.digest (or pullPolicy Always) to pin"
checkov.io/skip3: "CKV_K8S_43=The default follows the chart appVersion tag; image.digest pins by digest for users who require it"
checkov.io/skip4: "CKV_K8S_38=The binary is a Kubernetes API client: it needs its service account token"
{{- end }}

{{- define "hawser.operator.securityScanSkips" -}}
{{ include "hawser.commonSecurityScanSkips" . }}
{{- end }}

{{- define "hawser.dataplane.securityScanSkips" -}}
{{ include "hawser.commonSecurityScanSkips" . }}
checkov.io/skip5: "CKV_K8S_19=nftables rules and the load-balancer health port live in the node's network namespace"
checkov.io/skip6: "CKV_K8S_25=NET_ADMIN only, which nft and conntrack need to program the node's netfilter; everything else is dropped"
checkov.io/skip7: "CKV_K8S_23=Runs as UID 0 because capabilities added for a non-root user are not effective in Kubernetes; the root user holds no capability but NET_ADMIN, no privilege escalation, read-only root"
checkov.io/skip8: "CKV_K8S_40=Same reason as CKV_K8S_23: UID 0 with every capability but NET_ADMIN dropped"
{{- end }}
