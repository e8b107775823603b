package haproxy

import (
	"slices"
	"strings"
	"testing"

	"github.com/endpointlag/endpointlag/probes/ingress/internal/readertest"
)

// The ports of TestRealHAProxy's 404 server and closed port in the captures.
const capturedNotFound, capturedClosed = "8404", "8405"

// wantWeb and wantAPI are the servers of haproxyConfig's backends after runtimeChanges and the
// health checks, given the ports of the 404 server and of the closed one.
func wantWeb() []string {
	return []string{
		`shop_svc_web_8080 "shop/web" 10.244.1.5:8080/TCP true `,
		// Freed: in maintenance, with the address it had.
		`shop_svc_web_8080 "shop/web" 10.244.1.6:8080/TCP false MAINT`,
		// Re-used for another pod: 10.244.1.7 is gone from it.
		`shop_svc_web_8080 "shop/web" 10.244.2.9:8080/TCP true `,
		`shop_svc_web_8080 "shop/web" 10.244.1.8:8080/TCP false DRAIN`,
		// A free slot as the controller writes them ("disabled": FMAINT and CMAINT).
		`shop_svc_web_8080 "shop/web" 127.0.0.1:1/TCP false MAINT`,
	}
}

func wantAPI(notFound, closed string) []string {
	return []string{
		`shop_api_http "shop/api" 127.0.0.1:` + notFound + `/TCP false NOLB`,
		`shop_api_http "shop/api" 127.0.0.1:` + closed + `/TCP false DOWN`,
		`shop_api_http "shop/api" [fd00:10:244:1::9]:8080/TCP false weight 0`,
		`shop_api_http "shop/api" 10.244.2.10:8080/TCP true `,
	}
}

func wantAll(notFound, closed string) []string {
	return slices.Concat(wantWeb(), wantAPI(notFound, closed), []string{`static "" 192.0.2.10:80/TCP true `})
}

// wantBackends is captureNames's answer: a backend HAProxy lacks comes back without servers.
func wantBackends(notFound, closed string) []string {
	return slices.Concat(wantWeb(), []string{`shop_gone_8080 "shop/gone" -`}, wantAPI(notFound, closed))
}

func TestParseCapture(t *testing.T) {
	answers, err := splitAnswers(readertest.Fixture(t, captureAll))
	if err != nil || len(answers) != 1 {
		t.Fatalf("%d answers, %v", len(answers), err)
	}
	all, err := parseState(answers[0])
	if err != nil {
		t.Fatal(err)
	}
	if got, want := readertest.Describe(all), wantAll(capturedNotFound, capturedClosed); !slices.Equal(got, want) {
		t.Errorf("got\n%q\nwant\n%q", got, want)
	}
	answers, err = splitAnswers(readertest.Fixture(t, captureBackends))
	if err != nil || len(answers) != len(captureNames) || strings.TrimSpace(answers[1]) != noBackend {
		t.Errorf("%s: %q %v", captureBackends, answers, err)
	}
}

func TestSplitAnswers(t *testing.T) {
	// A set command prints nothing; the next answer follows.
	got, err := splitAnswers([]byte("\nCan't find backend.\n\n1\n# be_name\n\n"))
	if want := []string{"", "Can't find backend.\n", "1\n# be_name\n"}; err != nil || !slices.Equal(got, want) {
		t.Errorf("got %q %v, want %q", got, err, want)
	}
	if _, err := splitAnswers([]byte("1\n# be_name\nx\n")); err == nil {
		t.Error("an answer without its empty line accepted")
	}
}

func TestStateOf(t *testing.T) {
	for _, tc := range []struct {
		op, admin, weight uint64
		want              string
	}{
		{2, 0, 1, ""},
		{1, 0, 1, ""}, // starting (slowstart): up, throttled
		{0, 0, 1, "DOWN"},
		{3, 0, 1, "NOLB"},
		{2, 0, 0, "weight 0"},
		{2, 0x08, 1, "DRAIN"},
		{2, 0x10, 1, "DRAIN"},
		{0, 0x01, 1, "MAINT"},
		{0, 0x02, 1, "MAINT"},
		{0, 0x20, 1, "MAINT"},
		{0, 0x05, 1, "MAINT"},
		{0, 0x09, 1, "MAINT"},
		// Disabled in the configuration, enabled since: CMAINT stays, the server is ready.
		{2, 0x04, 1, ""},
		// The FQDN was changed: nothing to do with traffic.
		{2, 0x40, 1, ""},
	} {
		if got := stateOf(tc.op, tc.admin, tc.weight); got != tc.want {
			t.Errorf("stateOf(%d, %#x, %d) = %q, want %q", tc.op, tc.admin, tc.weight, got, tc.want)
		}
	}
}

func TestServiceOf(t *testing.T) {
	for name, want := range map[string]string{
		"shop_svc_web_8080":                             "shop/web",
		"shop_svc_web_http":                             "shop/web",
		"shop_my-ingress_svc_web_80":                    "shop/web",
		"shop_web_8080":                                 "shop/web",
		"shop-web-8080":                                 "",
		"ing_shop_my-ingress-web_80":                    "",
		"haproxy-controller_default-local-service_http": "haproxy-controller/default-local-service",
		"static":    "",
		"shop_svc_": "",
		"a_b_c_d_e": "",
	} {
		if got := serviceOf(name).String(); got != want {
			t.Errorf("serviceOf(%q) = %q, want %q", name, got, want)
		}
	}
}

func TestParseErrors(t *testing.T) {
	header := "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_port\n"
	for _, tc := range []struct{ text, want string }{
		{"Permission denied\n", `not an answer of show servers state version 1: "Permission denied"`},
		{"2\n# be_id\n", "not an answer of show servers state version 1"},
		{"1\n# be_id be_name srv_name srv_addr\n", "no column srv_op_state"},
		{header + "1 b 1 s 10.0.0.1 2 0 1 1\n", "line 3: 9 fields, the header has 10"},
		{header + "1 b 1 s 10.0.0.300 2 0 1 1 80\n", "line 3: srv_addr"},
		{header + "1 b 1 s 10.0.0.1 2 x 1 1 80\n", "line 3: srv_admin_state"},
		{header + "1 b 1 s 10.0.0.1 2 0 1 1 70000\n", "line 3: srv_port"},
	} {
		_, err := parseState(tc.text)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want %q", tc.text, err, tc.want)
		}
	}
	// A server without an address yet is no endpoint; its backend is still there.
	got, err := parseState(header + "1 b 1 s - 0 32 1 1 80\n")
	if err != nil || len(got) != 1 || len(got[0].Servers) != 0 {
		t.Errorf("unresolved server: %+v %v", got, err)
	}
}

// FuzzParseState's seed corpus in testdata/fuzz holds the captures and a few odd answers.
func FuzzParseState(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		answers, err := splitAnswers(data)
		if err != nil {
			return
		}
		for _, a := range answers {
			backends, err := parseState(a)
			readertest.NoPanic(t, err)
			readertest.Check(t, backends, true)
			for _, b := range backends {
				if strings.ContainsAny(b.Name, " \n") {
					t.Errorf("backend name %q", b.Name)
				}
			}
		}
	})
}
