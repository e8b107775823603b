package cluster

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

// A pod's volumes, as far as the processes the lab runs need them: the projected ServiceAccount
// token volume the API server's admission adds to every pod (kube-api-access-*: a token bound to
// the pod, the cluster's CA from the kube-root-ca.crt ConfigMap, the namespace) and hostPath
// volumes. The kubelet writes each projected volume into the pod's directory of the state
// directory and the process starts under `lab exec-mounted`, which bind-mounts them at the
// container's mount paths in a mount namespace of the process's own. A hostPath volume mounted
// at its own path is the host's file already (the lab's processes share the host's root).

// defaultTokenSeconds is the lifetime the kubelet asks for when the projection names none, as
// the API server's admission writes it (3607 s: an hour and a few seconds, so that a token's
// expiry is told apart from the legacy one-hour tokens). The lab's runs are shorter.
const defaultTokenSeconds = 3607

// mount is one bind mount of a pod's process.
type mount struct{ src, dst string }

// podMounts writes the pod's projected volumes that container c mounts and returns the bind
// mounts its process needs. Volume types the lab does not have are an error.
func (k *kubelet) podMounts(ctx context.Context, pod *corev1.Pod, c *corev1.Container) ([]mount, error) {
	var out []mount
	for _, vm := range c.VolumeMounts {
		var vol *corev1.Volume
		for i := range pod.Spec.Volumes {
			if pod.Spec.Volumes[i].Name == vm.Name {
				vol = &pod.Spec.Volumes[i]
			}
		}
		switch {
		case vol == nil:
			return nil, fmt.Errorf("container %s: volume mount %s names no volume of the pod", c.Name, vm.Name)
		case vm.SubPath != "":
			return nil, fmt.Errorf("container %s: volume mount %s: subPath is not supported by the lab's kubelet", c.Name, vm.Name)
		case vol.HostPath != nil:
			if vol.HostPath.Path != vm.MountPath {
				if err := makeMountPoint(k.procs.dir, vm.MountPath); err != nil {
					return nil, fmt.Errorf("container %s: volume %s: the mount point: %w", c.Name, vol.Name, err)
				}
				out = append(out, mount{vol.HostPath.Path, vm.MountPath})
			}
		case vol.Projected != nil:
			dir := filepath.Join(k.procs.dir, "pods", string(pod.UID), vol.Name)
			if err := k.project(ctx, pod, vol.Projected, dir); err != nil {
				return nil, fmt.Errorf("container %s: volume %s: %w", c.Name, vol.Name, err)
			}
			if err := makeMountPoint(k.procs.dir, vm.MountPath); err != nil {
				return nil, fmt.Errorf("container %s: volume %s: the mount point: %w", c.Name, vol.Name, err)
			}
			out = append(out, mount{dir, vm.MountPath})
		default:
			return nil, fmt.Errorf("container %s: volume %s: only hostPath and projected volumes are supported by the lab's kubelet", c.Name, vol.Name)
		}
	}
	return out, nil
}

// project writes a projected volume's files into dir.
func (k *kubelet) project(ctx context.Context, pod *corev1.Pod, p *corev1.ProjectedVolumeSource, dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	write := func(path string, b []byte) error {
		full := filepath.Join(dir, filepath.Clean("/"+path))
		if err := os.MkdirAll(filepath.Dir(full), 0o700); err != nil {
			return err
		}
		return os.WriteFile(full, b, 0o600)
	}
	for _, src := range p.Sources {
		switch {
		case src.ServiceAccountToken != nil:
			t := src.ServiceAccountToken
			req := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
				ExpirationSeconds: ptr.To(int64(defaultTokenSeconds)),
				BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
			}}
			if t.ExpirationSeconds != nil {
				req.Spec.ExpirationSeconds = t.ExpirationSeconds
			}
			if t.Audience != "" {
				req.Spec.Audiences = []string{t.Audience}
			}
			tok, err := k.client.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(ctx, pod.Spec.ServiceAccountName, req, metav1.CreateOptions{})
			if err != nil {
				return fmt.Errorf("a token for service account %s/%s: %w", pod.Namespace, pod.Spec.ServiceAccountName, err)
			}
			if err := write(t.Path, []byte(tok.Status.Token)); err != nil {
				return err
			}
		case src.ConfigMap != nil:
			cm, err := k.client.CoreV1().ConfigMaps(pod.Namespace).Get(ctx, src.ConfigMap.Name, metav1.GetOptions{})
			if err != nil {
				return fmt.Errorf("configMap %s: %w", src.ConfigMap.Name, err)
			}
			items := src.ConfigMap.Items
			if len(items) == 0 {
				for key := range cm.Data {
					items = append(items, corev1.KeyToPath{Key: key, Path: key})
				}
			}
			for _, it := range items {
				v, ok := cm.Data[it.Key]
				if !ok {
					return fmt.Errorf("configMap %s has no key %s", cm.Name, it.Key)
				}
				if err := write(it.Path, []byte(v)); err != nil {
					return err
				}
			}
		case src.DownwardAPI != nil:
			for _, it := range src.DownwardAPI.Items {
				if it.FieldRef == nil {
					return fmt.Errorf("downwardAPI %s: only fieldRef is supported by the lab's kubelet", it.Path)
				}
				v, err := fieldValue(pod, it.FieldRef.FieldPath, netip.Addr{}, netip.Addr{})
				if err != nil {
					return err
				}
				if err := write(it.Path, []byte(v)); err != nil {
					return err
				}
			}
		default:
			return fmt.Errorf("only serviceAccountToken, configMap and downwardAPI projections are supported by the lab's kubelet")
		}
	}
	return nil
}

// kubernetesEnv is what the kubelet puts in every container's environment about the API
// server: the address and port of the `kubernetes` Service, which client-go's in-cluster
// configuration dials.
func (k *kubelet) kubernetesEnv(ctx context.Context) ([]string, error) {
	svc, err := k.client.CoreV1().Services(metav1.NamespaceDefault).Get(ctx, "kubernetes", metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("the kubernetes Service: %w", err)
	}
	if len(svc.Spec.Ports) == 0 {
		return nil, fmt.Errorf("the kubernetes Service has no port")
	}
	port := strconv.Itoa(int(svc.Spec.Ports[0].Port))
	return []string{"KUBERNETES_SERVICE_HOST=" + svc.Spec.ClusterIP, "KUBERNETES_SERVICE_PORT=" + port, "KUBERNETES_SERVICE_PORT_HTTPS=" + port,
		"KUBERNETES_PORT=tcp://" + svc.Spec.ClusterIP + ":" + port}, nil
}

// mountPointsFile, in the state directory, lists the directories the lab made on the host as
// mount points of pods' volumes, in the order it made them, so that Down — or the next lab,
// after a crash — removes them.
const mountPointsFile = "mountpoints"

var mountPointsMu sync.Mutex

// makeMountPoint makes dir, and the parents it lacks, on the host, recording each it made.
func makeMountPoint(stateDir, dir string) error {
	mountPointsMu.Lock()
	defer mountPointsMu.Unlock()
	var missing []string
	for d := filepath.Clean(dir); ; d = filepath.Dir(d) {
		if _, err := os.Stat(d); err == nil {
			break
		} else if !errors.Is(err, fs.ErrNotExist) || d == "/" {
			return err
		}
		missing = append(missing, d)
	}
	f, err := os.OpenFile(filepath.Join(stateDir, mountPointsFile), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	for i := len(missing) - 1; i >= 0; i-- {
		if err := os.Mkdir(missing[i], 0o755); err != nil {
			return err
		}
		if _, err := fmt.Fprintln(f, missing[i]); err != nil {
			return err
		}
	}
	return nil
}

// removeMountPoints removes the directories makeMountPoint made, newest first, each only if
// it is empty (a directory something else has filled since stays).
func removeMountPoints(stateDir string) error {
	mountPointsMu.Lock()
	defer mountPointsMu.Unlock()
	path := filepath.Join(stateDir, mountPointsFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	dirs := strings.Fields(string(b))
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := os.Remove(dirs[i]); err != nil && !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, syscall.ENOTEMPTY) {
			return err
		}
	}
	return os.Remove(path)
}
