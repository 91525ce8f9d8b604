{{- define "livestage.fullname" -}}
{{- printf "%s-livestage" .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{- define "livestage.labels" -}}
app.kubernetes.io/name: livestage
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "livestage.selector" -}}
app.kubernetes.io/name: livestage
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{- define "livestage.natsUrl" -}}
{{- if .Values.nats.enabled -}}
nats://{{ include "livestage.fullname" . }}-nats:4222
{{- else -}}
{{- required "nats.externalUrl is required when nats.enabled=false" .Values.nats.externalUrl -}}
{{- end -}}
{{- end -}}

{{- define "livestage.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}
