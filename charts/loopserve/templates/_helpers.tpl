{{/* Names and labels shared by the templates. */}}
{{- define "loopserve.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "loopserve.operatorName" -}}
{{ .Release.Name }}-operator
{{- end -}}

{{- define "loopserve.gatewayName" -}}
{{ .Release.Name }}-gateway
{{- end -}}

{{- define "loopserve.labels" -}}
app.kubernetes.io/part-of: loopserve
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "loopserve.podSecurity" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "loopserve.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
  - ALL
{{- end -}}
