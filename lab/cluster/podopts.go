package cluster

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/endpointlag/endpointlag/lab/pod"
)

// The pod annotations the lab's kubelet reads. They stand in for what a container image and a
// CNI plugin decide in a real cluster: how the process behaves, and which address it gets.
const (
	// OnSIGTERM chooses what a lab pod does on "SIGTERM", after its preStop hook: "exit" (the
	// default) closes the listener and every connection at once, so late traffic is refused;
	// "drain=5s" keeps serving for that long first; "drain-unready=5s" also answers the
	// kubelet's HTTP probes with 503 from the SIGTERM on, so its readiness fails while it drains.
	OnSIGTERM = "lab.endpointlag.dev/on-sigterm"
	// ExitAfter makes the pod's process exit on its own that long after it started ("2s"): a
	// pod that runs to completion, or a container that crashes, depending on its restartPolicy.
	ExitAfter = "lab.endpointlag.dev/exit-after"
	// ExitCode is the exit code after ExitAfter (0 by default).
	ExitCode = "lab.endpointlag.dev/exit-code"
	// PodIP asks for that address of the node's pod CIDR instead of the next free one, as a CNI
	// plugin's IP annotation does (Calico's cni.projectcalico.org/ipAddrs); the binder puts
	// such a pod on the node owning the address.
	PodIP = "lab.endpointlag.dev/ip"
)

// podOptions are a pod's lab annotations, checked.
type podOptions struct {
	onSIGTERM pod.OnSIGTERM
	exitAfter time.Duration
	exitCode  int
	// ip is the requested address; the zero Addr for any.
	ip netip.Addr
}

func parsePodOptions(annotations map[string]string) (podOptions, error) {
	var o podOptions
	var errs []error
	var err error
	if o.onSIGTERM, err = pod.ParseOnSIGTERM(annotations[OnSIGTERM]); err != nil {
		errs = append(errs, fmt.Errorf("annotation %s: %w", OnSIGTERM, err))
	}
	if v, ok := annotations[ExitAfter]; ok {
		if o.exitAfter, err = time.ParseDuration(v); err != nil || o.exitAfter <= 0 {
			errs = append(errs, fmt.Errorf("annotation %s: %q is not a positive duration", ExitAfter, v))
		}
	}
	if v, ok := annotations[ExitCode]; ok {
		if o.exitCode, err = strconv.Atoi(v); err != nil || o.exitCode < 0 || o.exitCode > 255 {
			errs = append(errs, fmt.Errorf("annotation %s: %q is not an exit code (0 to 255)", ExitCode, v))
		}
		if _, ok := annotations[ExitAfter]; !ok {
			errs = append(errs, fmt.Errorf("annotation %s needs %s: the process only exits on its own after that", ExitCode, ExitAfter))
		}
	}
	if v, ok := annotations[PodIP]; ok {
		if o.ip, err = netip.ParseAddr(v); err != nil || !o.ip.Is4() {
			errs = append(errs, fmt.Errorf("annotation %s: %q is not an IPv4 address", PodIP, v))
		}
	}
	return o, errors.Join(errs...)
}

// serveArgs are the `lab serve` arguments of a pod's process.
func (o podOptions) serveArgs(p *corev1.Pod) []string {
	ports := ""
	for i, port := range servePorts(p) {
		if i > 0 {
			ports += ","
		}
		ports += strconv.Itoa(port)
	}
	args := []string{"serve", "--name=" + p.Name, "--ports=" + ports, "--on-sigterm=" + o.onSIGTERM.String()}
	if o.exitAfter > 0 {
		args = append(args, "--exit-after="+o.exitAfter.String(), "--exit-code="+strconv.Itoa(o.exitCode))
	}
	return args
}

// servePorts are the ports `lab serve` listens on: the lab runs one process per pod, listening
// on every TCP port its containers declare (8080 when none does).
func servePorts(p *corev1.Pod) []int {
	if ports := containerPorts(p); len(ports) > 0 {
		return ports
	}
	return []int{8080}
}

// containerPorts are the TCP ports of all the pod's containers, in order, each once.
func containerPorts(p *corev1.Pod) []int {
	var ports []int
	for _, c := range p.Spec.Containers {
		for _, cp := range c.Ports {
			if (cp.Protocol == "" || cp.Protocol == corev1.ProtocolTCP) && !slices.Contains(ports, int(cp.ContainerPort)) {
				ports = append(ports, int(cp.ContainerPort))
			}
		}
	}
	return ports
}
