// Command render writes deploy/base, the kustomize base, from the Helm chart deploy/helm/endpointlag
// rendered with its default values (helm template), one file per template: the chart is the one
// source of both. With -check it writes nothing and fails when deploy/base differs from what it
// would write (make lint).
//
//	cd deploy/tools && go run ./render -helm "$HELM"          # make generate
//	cd deploy/tools && go run ./render -helm "$HELM" -check   # make lint
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/endpointlag/endpointlag/deploy/tools/internal/manifests"
)

func main() {
	helm := flag.String("helm", os.Getenv("HELM"), "the helm binary (default $HELM; make generate builds it)")
	chart := flag.String("chart", "../helm/endpointlag", "the chart")
	out := flag.String("out", "../base", "the kustomize base to write")
	check := flag.Bool("check", false, "write nothing; fail when -out differs from what would be written")
	flag.Parse()
	if *helm == "" {
		fmt.Fprintln(os.Stderr, "render: -helm (or $HELM) is required: make generate builds helm (deploy/tools/build-helm.sh)")
		os.Exit(2)
	}
	files, err := manifests.Render(*helm, *chart)
	if err != nil {
		fmt.Fprintf(os.Stderr, "render: %v\n", err)
		os.Exit(1)
	}
	if *check {
		if stale := manifests.Stale(*out, files); len(stale) > 0 {
			fmt.Fprintf(os.Stderr, "render: %s is stale (%s): the chart changed; run make generate and commit %s\n",
				*out, strings.Join(stale, ", "), *out)
			os.Exit(1)
		}
		return
	}
	if err := manifests.Write(*out, files); err != nil {
		fmt.Fprintf(os.Stderr, "render: %v\n", err)
		os.Exit(1)
	}
}
