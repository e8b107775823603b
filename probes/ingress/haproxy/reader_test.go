package haproxy

import (
	"bufio"
	"context"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/endpointlag/endpointlag/probes/ingress"
	"github.com/endpointlag/endpointlag/probes/ingress/internal/readertest"
)

// fakeAPI answers each connection's line of commands with answer(line), as HAProxy's runtime
// API does in its non-interactive mode, and records the lines.
type fakeAPI struct {
	l      net.Listener
	mu     sync.Mutex
	lines  []string
	answer func(line string) string
}

func newFakeAPI(t *testing.T, answer func(line string) string) *fakeAPI {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeAPI{l: l, answer: answer}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				line, err := bufio.NewReader(c).ReadString('\n')
				if err != nil {
					return
				}
				line = strings.TrimSuffix(line, "\n")
				f.mu.Lock()
				f.lines = append(f.lines, line)
				f.mu.Unlock()
				_, _ = c.Write([]byte(f.answer(line)))
			}()
		}
	}()
	t.Cleanup(func() { l.Close() })
	return f
}

func (f *fakeAPI) reader(t *testing.T, timeout time.Duration) ingress.Reader {
	t.Helper()
	return readertest.Reader(t, Kind, "tcp://"+f.l.Addr().String(), timeout)
}

func TestReaderOnCaptures(t *testing.T) {
	all, some := string(readertest.Fixture(t, captureAll)), string(readertest.Fixture(t, captureBackends))
	backendsLine := "show servers state " + strings.Join(captureNames, ";show servers state ")
	api := newFakeAPI(t, func(line string) string {
		switch line {
		case "show servers state":
			return all
		case backendsLine:
			return some
		}
		return "Unknown command: '" + line + "'\n\n"
	})
	r := api.reader(t, 2*time.Second)
	got, err := r.Read(context.Background())
	if want := wantAll(capturedNotFound, capturedClosed); err != nil || !slices.Equal(readertest.Describe(got), want) {
		t.Errorf("Read: %v\n got %q\nwant %q", err, readertest.Describe(got), want)
	}
	got, ok, err := r.ReadBackends(context.Background(), captureNames)
	if want := wantBackends(capturedNotFound, capturedClosed); err != nil || !ok || !slices.Equal(readertest.Describe(got), want) {
		t.Errorf("ReadBackends: %v %v\n got %q\nwant %q", ok, err, readertest.Describe(got), want)
	}
	if !slices.Equal(api.lines, []string{"show servers state", backendsLine}) {
		t.Errorf("sent %q", api.lines)
	}
}

// Many names go over several connections, each line well inside HAProxy's buffer.
func TestReadBackendsSplitsLongLines(t *testing.T) {
	api := newFakeAPI(t, func(line string) string {
		return strings.Repeat(noBackend+"\n\n", strings.Count(line, ";")+1)
	})
	var names []string
	for i := range 300 {
		names = append(names, strings.Repeat("n", 60)+"_"+string(rune('a'+i%26))+strings.Repeat("x", i%7))
	}
	got, ok, err := api.reader(t, 2*time.Second).ReadBackends(context.Background(), names)
	if err != nil || !ok || len(got) != len(names) {
		t.Fatalf("%d backends, %v %v", len(got), ok, err)
	}
	for i, b := range got {
		if b.Name != names[i] || len(b.Servers) != 0 {
			t.Errorf("backend %d: %+v", i, b)
		}
	}
	if len(api.lines) < 2 {
		t.Errorf("%d lines for %d names", len(api.lines), len(names))
	}
	for _, l := range api.lines {
		if len(l) > maxLine {
			t.Errorf("a line of %d bytes", len(l))
		}
	}
}

func TestReaderErrors(t *testing.T) {
	var where string
	for _, tc := range []struct {
		name   string
		answer string
		read   func(ingress.Reader) error
		want   string
	}{
		{"refused", "Permission denied\n\n", readAll, `show servers state: not an answer of show servers state version 1: "Permission denied"`},
		{"cut short", "1\n# be_name srv_name\n", readAll, "an answer cut short"},
		{"answers missing", noBackend + "\n\n", func(r ingress.Reader) error {
			_, _, err := r.ReadBackends(context.Background(), []string{"a", "b"})
			return err
		}, "1 answers to 2 commands"},
		{"bad name", "", func(r ingress.Reader) error {
			_, _, err := r.ReadBackends(context.Background(), []string{"a;shutdown sessions"})
			return err
		}, `"a;shutdown sessions" is not a backend name`},
	} {
		api := newFakeAPI(t, func(string) string { return tc.answer })
		where = "tcp://" + api.l.Addr().String()
		err := tc.read(api.reader(t, 2*time.Second))
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), where) {
			t.Errorf("%s: error %v, want %q naming %s", tc.name, err, tc.want, where)
		}
	}
}

func readAll(r ingress.Reader) error {
	_, err := r.Read(context.Background())
	return err
}

// A runtime API that never answers costs the timeout, and a cancelled context ends the read.
func TestReaderTimeout(t *testing.T) {
	hold := make(chan struct{})
	defer close(hold)
	api := newFakeAPI(t, func(string) string {
		<-hold
		return ""
	})
	start := time.Now()
	if _, err := api.reader(t, 100*time.Millisecond).Read(context.Background()); err == nil || time.Since(start) > 5*time.Second {
		t.Errorf("no timeout: %v after %s", err, time.Since(start))
	}
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	if _, err := api.reader(t, time.Hour).Read(ctx); err == nil || !strings.Contains(err.Error(), "context canceled") {
		t.Errorf("cancel: %v", err)
	}
}

// Target.Dial, when set, opens the connection (inside the proxy's pod).
func TestReaderDials(t *testing.T) {
	api := newFakeAPI(t, func(string) string { return noBackend + "\n\n" })
	var dialed string
	r, err := New(ingress.Target{Address: "unix:///var/run/haproxy-runtime-api.sock", Timeout: time.Second,
		Dial: func(ctx context.Context, network, address string) (net.Conn, error) {
			dialed = network + " " + address
			var d net.Dialer
			return d.DialContext(ctx, "tcp", api.l.Addr().String())
		}})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := r.ReadBackends(context.Background(), []string{"x"}); err != nil || dialed != "unix /var/run/haproxy-runtime-api.sock" {
		t.Errorf("dialed %q: %v", dialed, err)
	}
}

func TestNewRefuses(t *testing.T) {
	if k, err := ingress.Lookup(Kind); err != nil || k.Scheme != "tcp" || k.DefaultPort != 9999 {
		t.Errorf("kind %+v, %v", k, err)
	}
	for _, addr := range []string{"http://10.0.0.1:9999", "tcp://10.0.0.1", "tcp://10.0.0.1:9999/x", "unix://host/x", "unix://", "10.0.0.1:9999"} {
		if _, err := New(ingress.Target{Address: addr, Timeout: time.Second}); err == nil {
			t.Errorf("%q accepted", addr)
		}
	}
	if _, err := New(ingress.Target{Address: "tcp://10.0.0.1:9999"}); err == nil {
		t.Error("no timeout accepted")
	}
}
