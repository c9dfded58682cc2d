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

{{- define "loopserve.natsName" -}}
{{ .Release.Name }}-nats
{{- end -}}

{{/* The NATS URL the operator, the gateway and the workers use: the quickstart server's when it
is enabled, nats.url otherwise. */}}
{{- define "loopserve.natsURL" -}}
{{- if .Values.quickstartNats.enabled -}}
nats://{{ include "loopserve.natsName" . }}.{{ .Release.Namespace }}.svc:4222
{{- else -}}
{{ .Values.nats.url }}
{{- end -}}
{{- end -}}
