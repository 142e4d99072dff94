{{/* Names ------------------------------------------------------------------------------ */}}

{{- define "ember.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name; objects append -controller, -worker, -redis (so keep it <= 52). */}}
{{- define "ember.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ember.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels: call with (dict "ctx" $ "component" "controller"). */}}
{{- define "ember.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ember.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "ember.labels" -}}
helm.sh/chart: {{ include "ember.chart" .ctx }}
{{ include "ember.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: ember
{{- end }}

{{- define "ember.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}

{{- define "ember.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ember.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ember.workerServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- printf "%s-worker" (include "ember.fullname" .) }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Secrets ---------------------------------------------------------------------------- */}}

{{/* The chart's own Secret, holding whatever credentials are not in an existing Secret. */}}
{{- define "ember.secretName" -}}
{{- include "ember.fullname" . }}
{{- end }}

{{- define "ember.authSecretName" -}}
{{- default (include "ember.secretName" .) .Values.auth.existingSecret }}
{{- end }}

{{- define "ember.s3HasStaticCredentials" -}}
{{- if or .Values.s3.existingSecret .Values.s3.accessKeyId }}true{{ end }}
{{- end }}

{{- define "ember.s3SecretName" -}}
{{- default (include "ember.secretName" .) .Values.s3.existingSecret }}
{{- end }}

{{/* Where the controller's --state URL comes from: (dict "name" SECRET "key" KEY). */}}
{{- define "ember.stateSecretRef" -}}
{{- if and (not .Values.redis.enabled) .Values.redis.external.existingSecret -}}
name: {{ .Values.redis.external.existingSecret }}
key: {{ .Values.redis.external.existingSecretKey }}
{{- else -}}
name: {{ include "ember.secretName" . }}
key: state-url
{{- end }}
{{- end }}

{{- define "ember.redisHost" -}}
{{- printf "%s-redis.%s.svc" (include "ember.fullname" .) .Release.Namespace }}
{{- end }}

{{/* A value kept across upgrades: the one given, else the one in the live Secret, else new. */}}
{{- define "ember.persistentSecret" -}}
{{- $given := index . "given" }}
{{- if $given }}
{{- $given }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace (include "ember.secretName" .ctx) }}
{{- $data := dig "data" (dict) (default (dict) $existing) }}
{{- if hasKey $data .key }}
{{- index $data .key | b64dec }}
{{- else }}
{{- randAlphaNum 40 }}
{{- end }}
{{- end }}
{{- end }}

{{/* Environment shared by the controller and the workers: S3 endpoint and credentials. */}}
{{- define "ember.s3Env" -}}
{{- with .Values.s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_REGION
  value: {{ . | quote }}
{{- end }}
{{- if include "ember.s3HasStaticCredentials" . }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "ember.s3SecretName" . }}
      key: {{ if .Values.s3.existingSecret }}{{ .Values.s3.accessKeyIdKey }}{{ else }}AWS_ACCESS_KEY_ID{{ end }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "ember.s3SecretName" . }}
      key: {{ if .Values.s3.existingSecret }}{{ .Values.s3.secretAccessKeyKey }}{{ else }}AWS_SECRET_ACCESS_KEY{{ end }}
{{- end }}
{{- end }}

{{- define "ember.workerTokenEnv" -}}
- name: EMBER_WORKER_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "ember.authSecretName" . }}
      key: worker-token
{{- end }}

{{/* Security ---------------------------------------------------------------------------- */}}

{{- define "ember.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "ember.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Checks that the schema cannot express (they depend on several keys at once). */}}
{{- define "ember.validate" -}}
{{- if and (not .Values.redis.enabled) (not .Values.redis.external.url) (not .Values.redis.external.existingSecret) }}
{{- fail "redis.enabled is false but no external Redis is given: set redis.external.url (redis://HOST:6379/0) or redis.external.existingSecret" }}
{{- end }}
{{- if and .Values.redis.enabled (or .Values.redis.external.url .Values.redis.external.existingSecret) }}
{{- fail "redis.external is set but redis.enabled is true: set redis.enabled=false to use an external Redis" }}
{{- end }}
{{- if and .Values.s3.existingSecret (or .Values.s3.accessKeyId .Values.s3.secretAccessKey) }}
{{- fail "s3.existingSecret and s3.accessKeyId/secretAccessKey are both set: use one or the other" }}
{{- end }}
{{- if ne (empty .Values.s3.accessKeyId) (empty .Values.s3.secretAccessKey) }}
{{- fail "s3.accessKeyId and s3.secretAccessKey go together: set both, or neither (to use the pods' identity)" }}
{{- end }}
{{- if and (eq .Values.worker.cache.type "localPVC") (not .Values.worker.cache.localPVC.storageClassName) }}
{{- fail "worker.cache.type is localPVC but worker.cache.localPVC.storageClassName is empty: name a StorageClass that provisions node-local volumes" }}
{{- end }}
{{- include "ember.validateController" . }}
{{- end }}

{{/* TLS, limits, checkpoint roots and the deployments they must admit. */}}
{{- define "ember.validateController" -}}
{{- $c := .Values.controller }}
{{- if and $c.tls.enabled (not $c.tls.secretName) }}
{{- fail "controller.tls.enabled is true but controller.tls.secretName is empty: name a Secret of type kubernetes.io/tls holding tls.crt and tls.key (cert-manager's Certificate makes one)" }}
{{- end }}
{{- if and (not (kindIs "invalid" $c.limits.burst)) (kindIs "invalid" $c.limits.rateLimit) }}
{{- fail "controller.limits.burst is set but controller.limits.rateLimit is not: a burst only shapes a rate limit; set rateLimit (requests/s per API key) too, or drop burst" }}
{{- end }}
{{- /* Directories of the images and the chart's own mounts: a root over or under one would hide it. */}}
{{- $reserved := list "/bin" "/dev" "/etc" "/lib" "/lib64" "/opt/venv" "/proc" "/sbin" "/sys" "/tmp" "/usr" "/var/cache/ember" }}
{{- $seen := list }}
{{- range $i, $root := $c.checkpointRoots }}
{{- $path := $root.path }}
{{- if regexMatch "(^|/)[.][.]?(/|$)" $path }}
{{- fail (printf "controller.checkpointRoots[%d].path %q has a '.' or '..' segment: give the directory's plain absolute path" $i $path) }}
{{- end }}
{{- range $reserved }}
{{- if or (eq $path .) (hasPrefix (printf "%s/" .) $path) (hasPrefix (printf "%s/" $path) .) }}
{{- fail (printf "controller.checkpointRoots[%d].path %q overlaps %s, which the containers need: mount the checkpoints elsewhere, e.g. /models" $i $path .) }}
{{- end }}
{{- end }}
{{- if has $path $seen }}
{{- fail (printf "controller.checkpointRoots lists %q twice: each root is one mount, list it once" $path) }}
{{- end }}
{{- $seen = append $seen $path }}
{{- end }}
{{- /* Deployments the controller would refuse (403) at start: it would only log them and go on. */}}
{{- range .Values.deployments }}
{{- $uri := .checkpoint }}
{{- if hasPrefix "s3://" $uri }}
{{- $bucket := index (splitList "/" (trimPrefix "s3://" $uri)) 0 }}
{{- if and $c.allowedBuckets (not (has $bucket $c.allowedBuckets)) }}
{{- fail (printf "deployment %s reads bucket %q, which controller.allowedBuckets does not list: add it there" .name $bucket) }}
{{- end }}
{{- else if or (not (contains "://" $uri)) (hasPrefix "file://" $uri) }}
{{- $local := trimPrefix "file://" $uri }}
{{- $admitted := false }}
{{- range $c.checkpointRoots }}
{{- if or (eq $local .path) (hasPrefix (printf "%s/" .path) $local) }}
{{- $admitted = true }}
{{- end }}
{{- end }}
{{- if not $admitted }}
{{- fail (printf "deployment %s reads %s, which is under none of controller.checkpointRoots: add the directory holding it there (with the volume it comes from), or use an s3:// checkpoint" .name $local) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Checkpoint roots and TLS ------------------------------------------------------------ */}}

{{/* Every checkpoint root is mounted read-only at the same path in the controller and in the
workers: the controller checks a checkpoint under the path a worker then loads it from. */}}
{{- define "ember.checkpointRootMounts" -}}
{{- range $i, $root := .Values.controller.checkpointRoots }}
- name: {{ printf "checkpoints-%d" $i }}
  mountPath: {{ $root.path | quote }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "ember.checkpointRootVolumes" -}}
{{- range $i, $root := .Values.controller.checkpointRoots }}
- name: {{ printf "checkpoints-%d" $i }}
  {{- toYaml $root.volume | nindent 2 }}
{{- end }}
{{- end }}

{{/* The Secret holding the PEM that the controller's certificate chains to, and its key. */}}
{{- define "ember.controllerCASecretName" -}}
{{- default .Values.controller.tls.secretName .Values.controller.tls.ca.secretName }}
{{- end }}

{{/* The name workers dial (and the certificate must carry): the controller Service's DNS name. */}}
{{- define "ember.controllerServiceHost" -}}
{{- printf "%s-controller.%s.svc" (include "ember.fullname" .) .Release.Namespace }}
{{- end }}
