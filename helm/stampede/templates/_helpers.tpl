{{/* Chart name. */}}
{{- define "stampede.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped name. */}}
{{- define "stampede.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Common labels. */}}
{{- define "stampede.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "stampede.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: stampede
{{- end -}}

{{/* Selector labels of one component: pass (dict "root" $ "component" "delivery"). */}}
{{- define "stampede.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stampede.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "stampede.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "stampede.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-secrets" (include "stampede.fullname" .)) -}}
{{- end -}}

{{- define "stampede.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "stampede.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/* Environment shared by every container: the ConfigMap and the Secret. */}}
{{- define "stampede.envFrom" -}}
- configMapRef:
    name: {{ include "stampede.fullname" . }}-config
- secretRef:
    name: {{ include "stampede.secretName" . }}
{{- end -}}

{{/* The components and whether each serves HTTP. */}}
{{- define "stampede.components" -}}
ingest: true
inbox: false
fanout: false
delivery: false
{{- end -}}
