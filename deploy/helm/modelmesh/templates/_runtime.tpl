{{/*
The runtime container beside the mesh (runtime.type mmesh, mlserver or triton), as
ModelMesh runs a ServingRuntime's containers in the mesh's pod. It listens on loopback
or a unix socket only the mesh uses; the Service does not expose it.
*/}}
{{- define "modelmesh.runtimeContainer" -}}
{{- $t := .Values.runtime.type -}}
{{- $r := .Values.runtime -}}
- name: runtime
  {{- if eq $t "mmesh" }}
  {{- $img := $r.mmesh.image | default dict }}
  image: {{ if $img.repository }}{{ printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) }}{{ else }}{{ include "modelmesh.image" . }}{{ end }}
  imagePullPolicy: {{ $img.pullPolicy | default .Values.image.pullPolicy }}
  command: [modelmesh, runtime]
  args:
    - --listen=unix:{{ $r.mmesh.socketDir }}/runtime.sock
    - --models-root={{ .Values.models.root }}
    # The runtime reports this capacity to the mesh (runtimeStatus), which uses it.
    - --capacity={{ include "modelmesh.capacity" . }}
    {{- range $r.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  # No probes: the kubelet cannot probe a unix socket. The mesh waits for the runtime at
  # start-up, and a runtime that dies restarts with its container.
  {{- else if eq $t "mlserver" }}
  image: {{ printf "%s:%s" $r.mlserver.image.repository $r.mlserver.image.tag }}
  imagePullPolicy: {{ $r.mlserver.image.pullPolicy }}
  command: [mlserver, start, {{ $r.repositoryPath | quote }}]
  {{- with $r.extraArgs }}
  args:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- else if eq $t "triton" }}
  image: {{ printf "%s:%s" $r.triton.image.repository $r.triton.image.tag }}
  imagePullPolicy: {{ $r.triton.image.pullPolicy }}
  command: [tritonserver]
  args:
    - --model-repository={{ $r.repositoryPath }}
    - --model-control-mode=explicit
    - --grpc-port={{ $r.triton.grpcPort }}
    - --http-port={{ $r.triton.httpPort }}
    - --allow-metrics=false
    {{- range $r.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  {{- end }}
  {{- if or (eq $t "mlserver") (eq $t "triton") (and (eq $t "mmesh") $r.extraEnv) }}
  env:
    {{- if eq $t "mlserver" }}
    - name: MLSERVER_GRPC_PORT
      value: {{ $r.mlserver.grpcPort | quote }}
    - name: MLSERVER_HTTP_PORT
      value: {{ $r.mlserver.httpPort | quote }}
    # The mesh loads models through the repository API; nothing at start-up.
    - name: MLSERVER_LOAD_MODELS_AT_STARTUP
      value: "false"
    - name: MLSERVER_METRICS_ENDPOINT
      value: ""
    {{- end }}
    {{- if eq $t "triton" }}
    - name: HOME
      value: /tmp
    {{- end }}
    {{- with $r.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  {{- if or (eq $t "mlserver") (eq $t "triton") }}
  {{- $http := ternary $r.mlserver.httpPort $r.triton.httpPort (eq $t "mlserver") }}
  ports:
    - name: runtime-http
      containerPort: {{ $http }}
      protocol: TCP
  startupProbe:
    httpGet:
      path: /v2/health/ready
      port: runtime-http
    periodSeconds: 2
    failureThreshold: 150
  readinessProbe:
    httpGet:
      path: /v2/health/ready
      port: runtime-http
    periodSeconds: 5
  livenessProbe:
    httpGet:
      path: /v2/health/live
      port: runtime-http
    periodSeconds: 10
    failureThreshold: 3
  {{- end }}
  resources:
    {{- toYaml $r.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.containerSecurityContext | nindent 4 }}
  volumeMounts:
    - name: runtime-tmp
      mountPath: /tmp
    {{- if eq $t "mmesh" }}
    - name: runtime-socket
      mountPath: {{ $r.mmesh.socketDir }}
    {{- if .Values.models.volume }}
    - name: models
      mountPath: {{ .Values.models.root }}
      readOnly: true
    {{- end }}
    {{- else }}
    - name: model-repository
      mountPath: {{ $r.repositoryPath }}
    {{- end }}
{{- end -}}
