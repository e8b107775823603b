// Command dashboards writes endpointlag's Grafana dashboards (docs/dashboards.md) as JSON files,
// built with grafana-foundation-sdk: `cd dashboards && go run .` (make generate).
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
)

func main() {
	dir := flag.String("dir", ".", "directory to write the dashboards to")
	flag.Parse()
	if err := write(*dir); err != nil {
		fmt.Fprintln(os.Stderr, "dashboards:", err)
		os.Exit(1)
	}
}

func write(dir string) error {
	for _, d := range dashboards {
		out, err := render(d.build)
		if err != nil {
			return fmt.Errorf("%s: %w", d.file, err)
		}
		if err := os.WriteFile(filepath.Join(dir, d.file), out, 0o644); err != nil {
			return err
		}
	}
	return nil
}
