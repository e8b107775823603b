package cluster

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestImageRepo(t *testing.T) {
	for in, want := range map[string]string{
		"lab/traefik":                 "lab/traefik",
		"lab/traefik:v3.7.13":         "lab/traefik",
		"registry:5000/lab/haproxy":   "registry:5000/lab/haproxy",
		"registry:5000/lab/haproxy:2": "registry:5000/lab/haproxy",
		"lab/web@sha256:abc":          "lab/web",
	} {
		if got := imageRepo(in); got != want {
			t.Errorf("imageRepo(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestExpand(t *testing.T) {
	vars := map[string]string{"POD_IP": "10.244.1.5", "PORT": "9999"}
	for in, want := range map[string]string{
		"ipv4@$(POD_IP):$(PORT)": "ipv4@10.244.1.5:9999",
		"$$(POD_IP)":             "$(POD_IP)",
		"$(UNKNOWN) stays":       "$(UNKNOWN) stays",
		"a $ alone, $(unclosed":  "a $ alone, $(unclosed",
		"${POD_IP} is HAProxy's": "${POD_IP} is HAProxy's",
		"ends with $":            "ends with $",
	} {
		if got := expand(in, vars); got != want {
			t.Errorf("expand(%q) = %q, want %q", in, got, want)
		}
	}
}

func proxyPod(c corev1.Container) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ingress", Name: "traefik", UID: "u1", Labels: map[string]string{"app": "traefik"}},
		Spec:       corev1.PodSpec{NodeName: "node2", Containers: []corev1.Container{c}},
	}
}

func fieldEnv(name, path string) corev1.EnvVar {
	return corev1.EnvVar{Name: name, ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: path}}}
}

func TestImageProcess(t *testing.T) {
	images := map[string]string{ImageTraefik: "/cache/traefik", ImageHAProxy: ""}
	ip, host := netip.MustParseAddr("10.244.2.7"), netip.MustParseAddr("10.99.0.12")
	pod := proxyPod(corev1.Container{
		Name: "traefik", Image: "lab/traefik:v3.7.13",
		Command: []string{"/usr/local/bin/traefik", "--log.level=$(LEVEL)"},
		Args:    []string{"--entryPoints.web.address=$(POD_IP):8000", "--x=$$(POD_IP)"},
		Env: []corev1.EnvVar{
			fieldEnv("POD_IP", "status.podIP"), fieldEnv("POD_NAME", "metadata.name"), fieldEnv("NAMESPACE", "metadata.namespace"),
			fieldEnv("NODE", "spec.nodeName"), fieldEnv("HOST_IP", "status.hostIP"), fieldEnv("APP", "metadata.labels['app']"),
			{Name: "LEVEL", Value: "DEBUG"}, {Name: "ADDR", Value: "$(POD_IP):9000"},
		},
		Ports: []corev1.ContainerPort{{Name: "web", ContainerPort: 8000}, {Name: "traefik", ContainerPort: 9000}},
	})
	spec, ok, err := imageProcess(pod, images, ip, host)
	if err != nil || !ok {
		t.Fatalf("imageProcess: %v, %t", err, ok)
	}
	wantArgs := []string{"--log.level=DEBUG", "--entryPoints.web.address=10.244.2.7:8000", "--x=$(POD_IP)"}
	wantEnv := []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "HOSTNAME=traefik",
		"POD_IP=10.244.2.7", "POD_NAME=traefik", "NAMESPACE=ingress", "NODE=node2", "HOST_IP=10.99.0.12", "APP=traefik",
		"LEVEL=DEBUG", "ADDR=10.244.2.7:9000"}
	if spec.binary != "/cache/traefik" || !slices.Equal(spec.args, wantArgs) || !slices.Equal(spec.env, wantEnv) || spec.listen != 8000 {
		t.Errorf("spec %+v\nwant args %q\nenv %q", spec, wantArgs, wantEnv)
	}

	for _, tc := range []struct {
		name    string
		c       corev1.Container
		wantErr string
	}{
		{"an image the lab has no binary for", corev1.Container{Name: "haproxy", Image: "lab/haproxy"}, errNoBinary.Error()},
		{"a command naming another binary", corev1.Container{Name: "traefik", Image: "lab/traefik", Command: []string{"sh", "-c", "traefik"}}, `command "sh": image lab/traefik holds only traefik`},
		{"a Secret", corev1.Container{Name: "traefik", Image: "lab/traefik", Env: []corev1.EnvVar{{Name: "T", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{Key: "t"}}}}}, "only fieldRef"},
		{"an unknown field", corev1.Container{Name: "traefik", Image: "lab/traefik", Env: []corev1.EnvVar{fieldEnv("X", "spec.schedulerName")}}, `fieldRef "spec.schedulerName"`},
	} {
		_, ok, err := imageProcess(proxyPod(tc.c), images, ip, host)
		if !ok || err == nil || !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("%s: %t, %v; want an error with %q", tc.name, ok, err, tc.wantErr)
		}
	}
	if _, ok, err := imageProcess(proxyPod(corev1.Container{Name: "web", Image: ImageWeb}), images, ip, host); ok || err != nil {
		t.Errorf("lab/web: %t, %v; want `lab serve`", ok, err)
	}
	if spec, _, err := imageProcess(proxyPod(corev1.Container{Name: "traefik", Image: "lab/traefik"}), images, ip, host); err != nil || spec.listen != 0 || len(spec.args) != 0 {
		t.Errorf("no ports, no args: %+v, %v", spec, err)
	}
}
