// Package testutil holds what the tests of endpointlag's command and of its internal packages
// share.
package testutil

import (
	"bytes"
	"io"
	"log/slog"
	"sync"
)

// SyncBuffer is a log sink safe for the goroutines of the code under test.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// DebugLogger is a text logger to w that keeps the debug messages.
func DebugLogger(w io.Writer) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}
