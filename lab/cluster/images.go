package cluster

import (
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// The lab has no container runtime: a pod runs one process. Most run `lab serve`; a pod whose
// first container's image is one of the lab's own images runs that image's binary instead, with
// the container's command, args and environment, as a container runtime would run the image's
// entrypoint.
const (
	// ImageWeb is the lab's HTTP server (`lab serve`), also what any image the lab does not know
	// runs.
	ImageWeb = "lab/web"
	// ImageTraefik runs Config.Traefik.
	ImageTraefik = "lab/traefik"
	// ImageHAProxy runs Config.HAProxy.
	ImageHAProxy = "lab/haproxy"
	// ImageEndpointlag runs Config.Endpointlag: the repository the Helm chart and the
	// kustomize base name by default.
	ImageEndpointlag = "endpointlag/endpointlag"
)

// DaemonPort is the port the daemon serves on (its default --web.listen-address).
const DaemonPort = 9860

// imageRepo is an image reference without its tag or digest: "lab/traefik:v3" → "lab/traefik".
func imageRepo(image string) string {
	if i := strings.IndexByte(image, '@'); i >= 0 {
		image = image[:i]
	}
	if i := strings.LastIndexByte(image, ':'); i > strings.LastIndexByte(image, '/') {
		image = image[:i]
	}
	return image
}

// errNoBinary: the pod's image is one of the lab's, but the lab was started without its binary.
var errNoBinary = errors.New("the lab has no binary for this image")

// processSpec is what a pod's process runs: a binary, its arguments and its environment
// (nil: the lab's own, for `lab serve`).
type processSpec struct {
	binary string
	args   []string
	env    []string
	// listen is the port the kubelet waits for the process to accept connections on before it
	// reports the pod running; 0 for none (the process counts as started at once).
	listen int
}

// imageProcess returns what pod's first container runs when its image is one of images (image
// repository → binary); ok is false for any other image, which runs `lab serve`. ip is the
// pod's address and host its node's, for the downward API; base is the environment the kubelet
// gives every container (KEY=value), before the container's own.
func imageProcess(pod *corev1.Pod, images map[string]string, ip, host netip.Addr, base ...string) (spec processSpec, ok bool, err error) {
	if len(pod.Spec.Containers) == 0 {
		return spec, false, nil
	}
	c := &pod.Spec.Containers[0]
	binary, ok := images[imageRepo(c.Image)]
	if !ok {
		return spec, false, nil
	}
	if binary == "" {
		return spec, true, fmt.Errorf("image %s: %w", c.Image, errNoBinary)
	}
	env, err := containerEnv(pod, c, ip, host, base)
	if err != nil {
		return spec, true, err
	}
	vars := map[string]string{}
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		vars[k] = v
	}
	// An image's entrypoint is its binary; a command replaces it, and may name it (by its base
	// name or any path ending in it): the lab's images hold nothing else.
	var args []string
	if len(c.Command) > 0 {
		if filepath.Base(expand(c.Command[0], vars)) != filepath.Base(binary) {
			return spec, true, fmt.Errorf("container %s: command %q: image %s holds only %s", c.Name, c.Command[0], c.Image, filepath.Base(binary))
		}
		for _, a := range c.Command[1:] {
			args = append(args, expand(a, vars))
		}
	}
	for _, a := range c.Args {
		args = append(args, expand(a, vars))
	}
	spec = processSpec{binary: binary, args: args, env: env}
	if ports := containerPorts(pod); len(ports) > 0 {
		spec.listen = ports[0]
	}
	return spec, true, nil
}

// containerEnv is the environment a container runtime would give container c: a base
// environment, then the container's env in order, each value expanded with the variables
// defined before it, as the kubelet does. Values from the downward API (fieldRef) are supported;
// other sources (ConfigMaps, Secrets, resources, envFrom) are not.
func containerEnv(pod *corev1.Pod, c *corev1.Container, ip, host netip.Addr, base []string) ([]string, error) {
	hostname := pod.Name
	if pod.Spec.HostNetwork {
		hostname = pod.Spec.NodeName
	}
	vars := map[string]string{
		"PATH":     "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME":     "/root",
		"HOSTNAME": hostname,
	}
	order := []string{"PATH", "HOME", "HOSTNAME"}
	for _, kv := range base {
		k, v, _ := strings.Cut(kv, "=")
		vars[k] = v
		order = append(order, k)
	}
	if len(c.EnvFrom) > 0 {
		return nil, fmt.Errorf("container %s: envFrom is not supported by the lab's kubelet", c.Name)
	}
	for _, e := range c.Env {
		v := expand(e.Value, vars)
		if e.ValueFrom != nil {
			if e.ValueFrom.FieldRef == nil {
				return nil, fmt.Errorf("container %s: env %s: only fieldRef (the downward API) is supported by the lab's kubelet", c.Name, e.Name)
			}
			var err error
			if v, err = fieldValue(pod, e.ValueFrom.FieldRef.FieldPath, ip, host); err != nil {
				return nil, fmt.Errorf("container %s: env %s: %w", c.Name, e.Name, err)
			}
		}
		if _, seen := vars[e.Name]; !seen {
			order = append(order, e.Name)
		}
		vars[e.Name] = v
	}
	env := make([]string, 0, len(order))
	for _, k := range order {
		env = append(env, k+"="+vars[k])
	}
	return env, nil
}

// fieldValue is a downward API field of pod, as the kubelet resolves it.
func fieldValue(pod *corev1.Pod, path string, ip, host netip.Addr) (string, error) {
	switch path {
	case "metadata.name":
		return pod.Name, nil
	case "metadata.namespace":
		return pod.Namespace, nil
	case "metadata.uid":
		return string(pod.UID), nil
	case "spec.nodeName":
		return pod.Spec.NodeName, nil
	case "spec.serviceAccountName":
		return pod.Spec.ServiceAccountName, nil
	case "status.podIP", "status.podIPs":
		return ip.String(), nil
	case "status.hostIP", "status.hostIPs":
		return host.String(), nil
	}
	for prefix, m := range map[string]map[string]string{"metadata.labels": pod.Labels, "metadata.annotations": pod.Annotations} {
		if key, ok := strings.CutPrefix(path, prefix+"['"); ok && strings.HasSuffix(key, "']") {
			return m[strings.TrimSuffix(key, "']")], nil
		}
	}
	return "", fmt.Errorf("fieldRef %q is not supported by the lab's kubelet", path)
}

// expand replaces $(NAME) in s by the variable's value, as the kubelet expands env values,
// commands and args: $$ is a literal $, and a reference to an unknown variable stays as it is.
func expand(s string, vars map[string]string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '$' || i+1 == len(s) {
			b.WriteByte(s[i])
			continue
		}
		switch s[i+1] {
		case '$':
			b.WriteByte('$')
			i++
		case '(':
			end := strings.IndexByte(s[i+2:], ')')
			if end < 0 {
				b.WriteString(s[i:])
				return b.String()
			}
			name := s[i+2 : i+2+end]
			if v, ok := vars[name]; ok {
				b.WriteString(v)
			} else {
				b.WriteString(s[i : i+3+end])
			}
			i += 2 + end
		default:
			b.WriteByte('$')
		}
	}
	return b.String()
}
