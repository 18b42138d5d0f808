{{/* Names and labels shared by every template. */}}
{{- define "fleet.name" -}}
{{- printf "%s" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "fleet.labels" -}}
app.kubernetes.io/name: inference-picker-fleet
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "fleet.selector" -}}
app.kubernetes.io/name: inference-picker-fleet
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fleet.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The REDIS_URL environment variable every process reads. */}}
{{- define "fleet.redisEnv" -}}
- name: REDIS_URL
{{- if eq .Values.redis.mode "external" }}
  valueFrom:
    secretKeyRef:
      name: {{ required "redis.external.existingSecret is required when redis.mode is external" .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.urlKey }}
{{- else if .Values.redis.bundled.sentinel }}
  value: {{ printf "redis-sentinel://%s-redis-0.%s-redis:26379,%s-redis-1.%s-redis:26379,%s-redis-2.%s-redis:26379/fleet" (include "fleet.name" .) (include "fleet.name" .) (include "fleet.name" .) (include "fleet.name" .) (include "fleet.name" .) (include "fleet.name" .) }}
{{- else }}
  value: {{ printf "redis://%s-redis:6379/0" (include "fleet.name" .) }}
{{- end }}
{{- end -}}

{{- define "fleet.podSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "fleet.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* The pool the pickers serve by default: picker.poolName, else the example's pool. */}}
{{- define "fleet.pickerPool" -}}
{{- if .Values.picker.poolName -}}
{{ .Values.picker.poolName }}
{{- else if .Values.example.enabled -}}
{{ .Values.example.pool.name }}
{{- end -}}
{{- end -}}
