package scenario

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/types"
)

// PodConvergence is the aggregator's figure for one pod (GET /api/v1/pods/{uid}).
type PodConvergence struct {
	Final    bool     `json:"final"`
	Home     string   `json:"home"`
	Reported []string `json:"reported"`
	Missing  []string `json:"missing"`
	Seconds  *float64 `json:"seconds"`
	// Convergence has the per-stage maxima and every node's stages on the pod's T0 axis.
	Convergence struct {
		Stages []struct {
			Stage   string  `json:"stage"`
			Seconds float64 `json:"seconds"`
			Node    string  `json:"node"`
			Source  string  `json:"source"`
		} `json:"stages"`
		Timeline []struct {
			Node    string  `json:"node"`
			Stage   string  `json:"stage"`
			Source  string  `json:"source"`
			Path    string  `json:"path"`
			Seconds float64 `json:"seconds"`
		} `json:"timeline"`
		Late []float64 `json:"late"`
		Dead []float64 `json:"dead"`
	} `json:"convergence"`
}

// Stage is the convergence at one stage ("all": over the routing stages), and whether it is known.
func (p PodConvergence) Stage(stage string) (float64, bool) {
	for _, s := range p.Convergence.Stages {
		if s.Stage == stage {
			return s.Seconds, true
		}
	}
	return 0, false
}

// Advice is the aggregator's figures for one workload (GET /api/v1/advice).
type Advice struct {
	Namespace string `json:"namespace"`
	Workload  struct {
		Kind string `json:"kind"`
		Name string `json:"name"`
	} `json:"workload"`
	Terminations uint64   `json:"terminations"`
	P99          *float64 `json:"p99_seconds"`
	Recommended  *float64 `json:"recommended_prestop_seconds"`
}

// PreStop is the recommended preStop (0 when there is none yet).
func (a Advice) PreStop() time.Duration {
	if a.Recommended == nil {
		return 0
	}
	return time.Duration(*a.Recommended * float64(time.Second))
}

func (a Advice) String() string {
	if a.P99 == nil {
		return "none: no convergence measured"
	}
	return fmt.Sprintf("%s = p99 convergence of %d terminations (%.3fs: the pod's deletion to the last node or proxy stopping new connections to it) + 1s margin, rounded up (endpointlag advise)",
		a.PreStop(), a.Terminations, *a.P99)
}

// Converged waits until the aggregator at base holds a final figure for every pod of uids, and
// returns them.
func Converged(ctx context.Context, base string, uids []types.UID, timeout time.Duration) (map[types.UID]PodConvergence, error) {
	out := map[types.UID]PodConvergence{}
	err := Poll(ctx, timeout, "the aggregator's final figures", func() error {
		var waiting []string
		for _, uid := range uids {
			if _, done := out[uid]; done {
				continue
			}
			var pc PodConvergence
			if err := getJSON(ctx, base+"/api/v1/pods/"+string(uid), &pc); err != nil || !pc.Final {
				waiting = append(waiting, string(uid))
				continue
			}
			out[uid] = pc
		}
		if len(waiting) > 0 {
			sort.Strings(waiting)
			return fmt.Errorf("%d pods not final yet (%s)", len(waiting), strings.Join(waiting, ", "))
		}
		return nil
	})
	return out, err
}

// WorkloadAdvice returns the aggregator's advice for one workload.
func WorkloadAdvice(ctx context.Context, base, namespace, kind, name string) (Advice, error) {
	var ads []Advice
	if err := getJSON(ctx, base+"/api/v1/advice", &ads); err != nil {
		return Advice{}, err
	}
	for _, a := range ads {
		if a.Namespace == namespace && a.Workload.Kind == kind && a.Workload.Name == name {
			return a, nil
		}
	}
	return Advice{}, fmt.Errorf("the aggregator has no advice for %s %s/%s", kind, namespace, name)
}

func getJSON(ctx context.Context, url string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}
