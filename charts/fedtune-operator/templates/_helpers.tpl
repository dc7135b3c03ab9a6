{{/* The chart's name, or nameOverride. */}}
{{- define "fedtune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's name for every object of the chart (at most 63 characters), or fullnameOverride. */}}
{{- define "fedtune-operator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "fedtune-operator.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "fedtune-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "fedtune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fedtune
{{- end -}}

{{- define "fedtune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedtune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fedtune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fedtune-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
What the operator does, and nothing more (fedtune_operator/reconcile.py and kopf):
- watches and patches its resources (kopf keeps its bookkeeping in annotations) and writes
  their status; `finalizers` is for the children's blockOwnerDeletion ownerReferences;
- lists, watches (to notice deletions) and creates the children; deletes pods (failed ones before a retry, and the rest
  when a job ends) and, once a finished job's spec.runPolicy.ttlSecondsAfterFinished has run out, its pods and
  Services (never a claim: the adapters stay); reads by name the Secrets it generated (the Redis password, the job's CA
  and certificates) and the CA Secret a job names in spec.tls.caSecret (get, never list);
- posts Events on its resources.
*/}}
{{- define "fedtune-operator.rules" -}}
- apiGroups: ["fedtune.io"]
  resources: ["federatedfinetunes"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["fedtune.io"]
  resources: ["federatedfinetunes/status"]
  verbs: ["get", "patch"]
- apiGroups: ["fedtune.io"]
  resources: ["federatedfinetunes/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["configmaps", "persistentvolumeclaims"]
  verbs: ["list", "watch", "create"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["list", "watch", "create"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}
