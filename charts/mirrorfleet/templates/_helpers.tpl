{{/* Names, labels and the image reference shared by every template. */}}

{{- define "mirrorfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mirrorfleet.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The operator's pods are the `controller` component; the fleets it creates use `proxy`,
     `edge`, `node-agent` and `cleanup` with `app.kubernetes.io/managed-by: mirrorfleet-operator`,
     so the selectors below never match them. */}}
{{- define "mirrorfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mirrorfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{- define "mirrorfleet.labels" -}}
{{ include "mirrorfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "mirrorfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mirrorfleet.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "mirrorfleet.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* Namespaces the fleet's pods live in, for the PodMonitors' namespaceSelector. */}}
{{- define "mirrorfleet.fleetNamespaceSelector" -}}
{{- if .Values.metrics.podMonitors.namespaces -}}
matchNames:
{{ toYaml .Values.metrics.podMonitors.namespaces }}
{{- else if .Values.watchNamespace -}}
matchNames:
- {{ .Values.watchNamespace }}
{{- else -}}
any: true
{{- end -}}
{{- end -}}
