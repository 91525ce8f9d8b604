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
{{ if .Values.nats.tls.enabled }}tls{{ else }}nats{{ end }}://{{ include "livestage.fullname" . }}-nats:4222
{{- else -}}
{{- required "nats.externalUrl is required when nats.enabled=false" .Values.nats.externalUrl -}}
{{- end -}}
{{- end -}}

{{- define "livestage.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{- /* The components that are LiveStage services (NATS and Redis clients), as a JSON list. */ -}}
{{- define "livestage.clientComponents" -}}
{{- $names := keys .Values.services | sortAlpha -}}
{{- if .Values.playground.enabled }}{{ $names = append $names "playground" }}{{ end -}}
{{- toJson $names -}}
{{- end -}}

{{- /* ---- NATS credentials ------------------------------------------------------------------ */ -}}

{{- /* Whether services log into NATS with a user and password. */ -}}
{{- define "livestage.natsAuth" -}}
{{- if or .Values.nats.enabled .Values.nats.auth.existingSecret }}true{{ end -}}
{{- end -}}

{{- define "livestage.natsSecret" -}}
{{- .Values.nats.auth.existingSecret | default (printf "%s-nats-auth" (include "livestage.fullname" .)) -}}
{{- end -}}

{{- /* The environment variable nats.conf reads a user's password from: LS_NATS_PW_<USER>. */ -}}
{{- define "livestage.natsPasswordVar" -}}
LS_NATS_PW_{{ . | upper | replace "-" "_" }}
{{- end -}}

{{- /* A JSON-style list of strings: ["a", "b"] (the layout nats_authorization() writes). */ -}}
{{- define "livestage.stringList" -}}
[{{ range $i, $s := . }}{{ if $i }}, {{ end }}{{ $s | toString | quote }}{{ end }}]
{{- end -}}

{{- /* nats.conf of the in-release server; passwords are $LS_NATS_PW_<USER> references. */ -}}
{{- define "livestage.natsConf" -}}
listen: 0.0.0.0:4222
http: 0.0.0.0:8222
max_payload: {{ .Values.nats.maxPayload }}
jetstream { store_dir: /data/jetstream, max_memory_store: 256MB, max_file_store: 1GB }
{{- if .Values.nats.tls.enabled }}
tls {
  cert_file: "/etc/nats-tls/tls.crt"
  key_file: "/etc/nats-tls/tls.key"
}
{{- end }}
authorization {
  users = [
{{- range $user, $perms := .Values.nats.users }}
{{- $publish := concat ($perms.publish | default list) (list "_I.*.*.blob") }}
{{- $subscribe := concat ($perms.subscribe | default list) (list (printf "_I.%s.>" $user)) }}
    {user: {{ $user | quote }}, password: ${{ include "livestage.natsPasswordVar" $user }}, permissions: {publish: {allow: {{ include "livestage.stringList" $publish }}}, subscribe: {allow: {{ include "livestage.stringList" $subscribe }}}, allow_responses: {max: 1000000}}}
{{- end }}
  ]
}
{{- end -}}

{{- /* ---- Redis credentials ----------------------------------------------------------------- */ -}}

{{- define "livestage.redisAuth" -}}
{{- if or .Values.redis.enabled .Values.redis.auth.existingSecret }}true{{ end -}}
{{- end -}}

{{- define "livestage.redisSecret" -}}
{{- .Values.redis.auth.existingSecret | default (printf "%s-redis-auth" (include "livestage.fullname" .)) -}}
{{- end -}}

{{- /* ---- What every LiveStage service container gets --------------------------------------- */ -}}

{{- /* env entries: its NATS user and password, the Redis login, the CA bundles. (dict root user) */ -}}
{{- define "livestage.clientEnv" -}}
{{- $root := .root -}}
{{- if include "livestage.natsAuth" $root }}
{{- if and $root.Values.nats.enabled (not (hasKey $root.Values.nats.users .user)) }}
{{- fail (printf "nats.users has no entry for the service %q" .user) }}
{{- end }}
- name: LIVESTAGE_NATS_USER
  value: {{ .user | quote }}
- name: LIVESTAGE_NATS_PASSWORD
  valueFrom: { secretKeyRef: { name: {{ include "livestage.natsSecret" $root }}, key: {{ .user }} } }
{{- end }}
{{- if $root.Values.nats.tls.enabled }}
- name: LIVESTAGE_NATS_TLS_CA
  value: /etc/livestage/nats-ca/ca.crt
{{- end }}
{{- if and .redis (include "livestage.redisAuth" $root) }}
- name: LIVESTAGE_REDIS_USERNAME
  value: {{ $root.Values.redis.auth.username | quote }}
- name: LIVESTAGE_REDIS_PASSWORD
  valueFrom: { secretKeyRef: { name: {{ include "livestage.redisSecret" $root }}, key: {{ $root.Values.redis.auth.passwordKey }} } }
{{- end }}
{{- if and .redis $root.Values.redis.tls.enabled }}
- name: LIVESTAGE_REDIS_TLS_CA
  value: /etc/livestage/redis-ca/ca.crt
{{- end }}
{{- end -}}

{{- /* volumeMounts entries for the CA bundles. (dict root redis) */ -}}
{{- define "livestage.clientMounts" -}}
{{- if .root.Values.nats.tls.enabled }}
- { name: nats-ca, mountPath: /etc/livestage/nats-ca, readOnly: true }
{{- end }}
{{- if and .redis .root.Values.redis.tls.enabled }}
- { name: redis-ca, mountPath: /etc/livestage/redis-ca, readOnly: true }
{{- end }}
{{- end -}}

{{- /* volumes for the CA bundles: only ca.crt of each TLS Secret, never the server's key. */ -}}
{{- define "livestage.clientVolumes" -}}
{{- if .root.Values.nats.tls.enabled }}
- name: nats-ca
  secret:
    secretName: {{ required "nats.tls.secretName is required with nats.tls.enabled" .root.Values.nats.tls.secretName }}
    items: [{ key: ca.crt, path: ca.crt }]
{{- end }}
{{- if and .redis .root.Values.redis.tls.enabled }}
- name: redis-ca
  secret:
    secretName: {{ required "redis.tls.secretName is required with redis.tls.enabled" .root.Values.redis.tls.secretName }}
    items: [{ key: ca.crt, path: ca.crt }]
{{- end }}
{{- end -}}

{{- /* ---- Tenants of the session API -------------------------------------------------------- */ -}}

{{- /* The Secret holding tenants.yaml: auth.tenantsSecret, or the chart's own from auth.tenants. */ -}}
{{- define "livestage.tenantsSecret" -}}
{{- if and .Values.auth.tenantsSecret .Values.auth.tenants -}}
{{- fail "set either auth.tenantsSecret (an existing Secret) or auth.tenants (entries the chart puts in a Secret), not both" -}}
{{- else if .Values.auth.tenants -}}
{{- printf "%s-tenants" (include "livestage.fullname" .) -}}
{{- else -}}
{{- required "auth.tenantsSecret is required: the session API serves only tenants with keys. Create the Secret from a tenants file (livestage tenant add NAME --file tenants.yaml; kubectl create secret generic livestage-tenants --from-file=tenants.yaml) and set auth.tenantsSecret=livestage-tenants, or list digests in auth.tenants" .Values.auth.tenantsSecret -}}
{{- end -}}
{{- end -}}
