package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"time"

	"github.com/chromedp/chromedp"
)

// waterfall is what the aggregator's page showed for one pod.
type waterfall struct {
	// Nodes are the nodes with a bar, sorted; Marks the stage marks on all bars.
	Nodes []string
	Marks int
	// Error is what the page printed as an error (empty: none).
	Error string
}

// errNoBrowser: Debian's chromium is not installed (make deps installs it).
var errNoBrowser = errors.New("no chromium on PATH (Debian's package chromium; make deps installs it)")

// renderWaterfall opens url in a headless Chromium, waits for the waterfall, reads what it shows
// and writes a screenshot (PNG) to shot. The browser is the test's own process, ended with it.
func renderWaterfall(ctx context.Context, url, shot string) (waterfall, error) {
	var w waterfall
	exe, err := exec.LookPath("chromium")
	if err != nil {
		return w, errNoBrowser
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(exe), chromedp.NoSandbox, chromedp.WindowSize(1060, 470))
	actx, cancelAlloc := chromedp.NewExecAllocator(ctx, opts...)
	defer cancelAlloc()
	bctx, cancelBrowser := chromedp.NewContext(actx)
	defer cancelBrowser()
	bctx, cancel := context.WithTimeout(bctx, 60*time.Second)
	defer cancel()
	if err := chromedp.Do(bctx, chromedp.Navigate(url), chromedp.WaitVisible(chromedp.ID("waterfall"))); err != nil {
		return w, fmt.Errorf("chromium on %s: %w", url, err)
	}
	if w.Nodes, err = chromedp.Run(bctx, chromedp.Evaluate[[]string](`[...document.querySelectorAll('#waterfall g[data-node]')].map(g => g.getAttribute('data-node')).sort()`)); err != nil {
		return w, err
	}
	if w.Marks, err = chromedp.Run(bctx, chromedp.Evaluate[int](`document.querySelectorAll('#waterfall rect.stage').length`)); err != nil {
		return w, err
	}
	if w.Error, err = chromedp.Run(bctx, chromedp.Evaluate[string](`document.getElementById('error').textContent`)); err != nil {
		return w, err
	}
	png, err := chromedp.Run(bctx, chromedp.CaptureScreenshot())
	if err != nil {
		return w, err
	}
	return w, os.WriteFile(shot, png, 0o644)
}
