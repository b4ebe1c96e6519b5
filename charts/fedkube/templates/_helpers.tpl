{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "fedkube.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects. */}}
{{- define "fedkube.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fedkube.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedkube.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "fedkube.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "fedkube.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fedkube
{{- end }}

{{- define "fedkube.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fedkube.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "fedkube.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
What the operator does in the namespaces it serves: the one list both the ClusterRole
(cluster-wide) and the per-namespace Roles (watchNamespaces) grant.
*/}}
{{- define "fedkube.namespacedRules" -}}
# The jobs: kopf watches them and adds its finalizer and annotations; the reconcile reads
# them, writes status, and deletes finished ones after ttlSecondsAfterFinished.
- apiGroups: ["fedkube.io"]
  resources: ["federatedjobs"]
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: ["fedkube.io"]
  resources: ["federatedjobs/status"]
  verbs: ["patch"]
# Pods are watched (their events trigger a reconcile) and listed by the job's label.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete"]
# The other children are read by name, created when missing, deleted on cleanup.
- apiGroups: [""]
  resources: ["services", "persistentvolumeclaims"]
  verbs: ["get", "create", "delete"]
# The pods' configuration is updated when the job's clients or sites change.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch", "delete"]
# The job's CA and certificates: listed by the job's label, re-issued (patch) when the CA or
# the aggregator's host names change, deleted when a site leaves the job.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create", "delete"]
{{- if .Values.rbac.gangScheduling }}
- apiGroups: ["scheduling.x-k8s.io"]
  resources: ["podgroups"]
  verbs: ["get", "create", "delete"]
{{- end }}
{{- if .Values.rbac.certManager }}
# Jobs with spec.security.tls.mode CertManager: the operator asks cert-manager for their
# certificates.
- apiGroups: ["cert-manager.io"]
  resources: ["certificates"]
  verbs: ["get", "create", "delete"]
{{- end }}
# Kubernetes Events on the jobs (kopf posts them with create).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if .Values.watchNamespaces }}
# Namespaced peering: kopf reads and refreshes its peers' records in each served namespace;
# the operator creates the object at start when it is missing (instead of waiting silently).
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch", "create"]
{{- end }}
{{- end }}

{{/* What kopf needs cluster-wide in every mode: it discovers CRDs to know what it can watch. */}}
{{- define "fedkube.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if not .Values.watchNamespaces }}
# Cluster-wide: kopf follows namespaces and meets its peers in a ClusterKopfPeering.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["get", "list", "watch", "patch", "create"]
{{- end }}
{{- end }}
