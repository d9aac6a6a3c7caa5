{{/* Names and labels. */}}
{{- define "modelmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "modelmesh.fullname" -}}
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

{{- define "modelmesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "modelmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The mesh pods (component=mesh); the bundled etcd is component=etcd. */}}
{{- define "modelmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "modelmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: mesh
{{- end -}}

{{- define "modelmesh.etcdName" -}}
{{- printf "%s-etcd" (include "modelmesh.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "modelmesh.etcdSelectorLabels" -}}
app.kubernetes.io/name: {{ include "modelmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: etcd
{{- end -}}

{{- define "modelmesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "modelmesh.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "modelmesh.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
Bytes in a Kubernetes memory quantity: a number with an optional binary (Ki Mi Gi Ti Pi)
or decimal (k/K M G T P) suffix. Fails with a message on anything else (milli, exponents).
*/}}
{{- define "modelmesh.quantityBytes" -}}
{{- $q := toString .quantity | trim -}}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|K|M|G|T|P)?$" $q) -}}
{{- fail (printf "%s: %q is not a memory quantity the chart can read (use e.g. 2Gi, 1536Mi, 2G, 2000000000)" .what $q) -}}
{{- end -}}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $q -}}
{{- $suffix := trimPrefix $number $q -}}
{{- $factors := dict "" 1.0 "k" 1e3 "K" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 -}}
{{- mulf (float64 $number) (get $factors $suffix) | floor | int64 -}}
{{- end -}}

{{/* The container that holds the models: the runtime container, or the mesh itself. */}}
{{- define "modelmesh.modelsResources" -}}
{{- if ne .Values.runtime.type "none" -}}
{{- toYaml (dict "what" "runtime.resources.limits.memory" "limits" (.Values.runtime.resources.limits | default dict)) -}}
{{- else -}}
{{- toYaml (dict "what" "resources.limits.memory" "limits" (.Values.resources.limits | default dict)) -}}
{{- end -}}
{{- end -}}

{{/*
--capacity in bytes: mesh.capacity when given, else mesh.capacityFraction x the memory
limit of the container that holds the models (floored to whole bytes).
*/}}
{{- define "modelmesh.capacity" -}}
{{- if .Values.mesh.capacity -}}
{{- .Values.mesh.capacity -}}
{{- else -}}
{{- $src := include "modelmesh.modelsResources" . | fromYaml -}}
{{- $limit := get $src.limits "memory" -}}
{{- if not $limit -}}
{{- fail (printf "%s is not set: the mesh's --capacity is mesh.capacityFraction of it. Set a memory limit, or mesh.capacity explicitly" $src.what) -}}
{{- end -}}
{{- $bytes := include "modelmesh.quantityBytes" (dict "quantity" $limit "what" $src.what) -}}
{{- mulf (float64 $bytes) (float64 .Values.mesh.capacityFraction) | floor | int64 -}}
{{- end -}}
{{- end -}}

{{/* Seconds of terminationGracePeriodSeconds: given, or derived from the drain timeout. */}}
{{- define "modelmesh.gracePeriod" -}}
{{- $drain := int .Values.mesh.drainTimeoutSeconds -}}
{{- $pre := int .Values.preStopSleepSeconds -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- add $drain $pre (int .Values.terminationGraceMarginSeconds) -}}
{{- else -}}
{{- $grace := int .Values.terminationGracePeriodSeconds -}}
{{- if le $grace (add $drain $pre) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be longer than mesh.drainTimeoutSeconds (%d) + preStopSleepSeconds (%d): the kubelet would kill the mesh before it has handed its models over. Raise it, lower the drain timeout, or leave terminationGracePeriodSeconds empty to derive it" $grace $drain $pre) -}}
{{- end -}}
{{- $grace -}}
{{- end -}}
{{- end -}}

{{/* "true" when readiness and startup probes use gRPC health (the kubelet's gRPC probe
speaks plaintext only: with TLS on the serving port, "auto" means HTTP /ready). */}}
{{- define "modelmesh.grpcProbes" -}}
{{- if eq .Values.probes.type "grpc" -}}
true
{{- else if and (eq .Values.probes.type "auto") (not .Values.tls.secretName) (semverCompare ">=1.24-0" .Capabilities.KubeVersion.Version) -}}
true
{{- end -}}
{{- end -}}

{{/* The etcd endpoints the mesh connects to (comma-separated), "" for an embedded etcd. */}}
{{- define "modelmesh.etcdEndpoints" -}}
{{- if .Values.etcd.endpoints -}}
{{- join "," .Values.etcd.endpoints -}}
{{- else if .Values.etcd.bundled.enabled -}}
{{- $name := include "modelmesh.etcdName" . -}}
{{- $eps := list -}}
{{- range $i := until (int .Values.etcd.bundled.replicas) -}}
{{- $eps = append $eps (printf "%s-%d.%s-headless.%s.svc:2379" $name $i $name $.Release.Namespace) -}}
{{- end -}}
{{- join "," $eps -}}
{{- end -}}
{{- end -}}

{{/* "true" when the bundled etcd is deployed. */}}
{{- define "modelmesh.bundledEtcd" -}}
{{- if and (not .Values.etcd.endpoints) .Values.etcd.bundled.enabled -}}true{{- end -}}
{{- end -}}

{{/* The storage-config Secret's name, "" when none is mounted. */}}
{{- define "modelmesh.storageSecret" -}}
{{- if .Values.storageConfig.existingSecret -}}
{{- .Values.storageConfig.existingSecret -}}
{{- else if .Values.storageConfig.storages -}}
{{- printf "%s-storage-config" (include "modelmesh.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The --runtime value for runtime.type. */}}
{{- define "modelmesh.runtimeAddress" -}}
{{- $t := .Values.runtime.type -}}
{{- if eq $t "mmesh" -}}
{{- printf "mmesh:unix:%s/runtime.sock" .Values.runtime.mmesh.socketDir -}}
{{- else if eq $t "mlserver" -}}
{{- printf "mlserver:127.0.0.1:%d" (int .Values.runtime.mlserver.grpcPort) -}}
{{- else if eq $t "triton" -}}
{{- printf "triton:127.0.0.1:%d" (int .Values.runtime.triton.grpcPort) -}}
{{- end -}}
{{- end -}}

{{/*
Checks the schema cannot express; every template that renders the mesh includes this.
*/}}
{{- define "modelmesh.validate" -}}
{{- $_ := include "modelmesh.gracePeriod" . -}}
{{- $_ = include "modelmesh.capacity" . -}}
{{- if and (not .Values.etcd.endpoints) (not .Values.etcd.bundled.enabled) (or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled) -}}
{{- fail "etcd: set etcd.endpoints (an existing cluster) or etcd.bundled.enabled=true. Without either every pod starts its own private etcd, so replicaCount > 1 (or autoscaling) would make separate meshes that do not share models" -}}
{{- end -}}
{{- if and (or .Values.etcd.tls.secretName .Values.etcd.auth.user) (not .Values.etcd.securityFlagsSupported) -}}
{{- fail "etcd.tls / etcd.auth are set, but etcd.securityFlagsSupported=false says this image's mesh has no --etcd-cacert/--etcd-cert/--etcd-key/--etcd-user/--etcd-password-file flags (modelmesh/settings.py). Use an image whose mesh supports them and leave etcd.securityFlagsSupported at true" -}}
{{- end -}}
{{- if and (or .Values.etcd.tls.secretName .Values.etcd.auth.user) (not .Values.etcd.endpoints) (not .Values.etcd.bundled.enabled) -}}
{{- fail "etcd.tls / etcd.auth apply to etcd.endpoints (an existing cluster); without endpoints or the bundled etcd each pod runs a private etcd, plaintext on loopback, which takes neither" -}}
{{- end -}}
{{- if and .Values.etcd.auth.user (not .Values.etcd.auth.passwordSecret.name) -}}
{{- fail "etcd.auth.user is set but etcd.auth.passwordSecret.name is not: name the Secret holding the password" -}}
{{- end -}}
{{- if and .Values.storageConfig.existingSecret .Values.storageConfig.storages -}}
{{- fail "storageConfig: set existingSecret (reuse a Secret) or storages (create one), not both" -}}
{{- end -}}
{{- $p := .Values.ports -}}
{{- if or (eq (int $p.grpc) (int $p.http)) (eq (int $p.grpc) (int $p.metrics)) (eq (int $p.http) (int $p.metrics)) -}}
{{- fail (printf "ports: grpc (%d), http (%d) and metrics (%d) must differ" (int $p.grpc) (int $p.http) (int $p.metrics)) -}}
{{- end -}}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled -}}
{{- fail "metrics: enable serviceMonitor or podMonitor, not both (every pod would be scraped twice)" -}}
{{- end -}}
{{- end -}}
