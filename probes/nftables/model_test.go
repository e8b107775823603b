package nftables

import (
	"encoding/binary"
	"testing"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

func TestParseChainName(t *testing.T) {
	for _, tc := range []struct {
		name, kind, service, proto, port string
	}{
		{"service-PFISGYVC-default/web/tcp/", "service", "default/web", "TCP", ""},
		{"service-2QRHZV4L-default/kubernetes/tcp/https", "service", "default/kubernetes", "TCP", "https"},
		{"external-PFISGYVC-shop/web/udp/dns", "external", "shop/web", "UDP", "dns"},
		{"endpoint-AAAAAAAA-shop/sticky/sctp/__10.244.1.7/80", "endpoint", "shop/sticky", "SCTP", ""},
		{"endpoint-5OJB2KTY-ns/svc/tcp/p__fd00:10:244:1::5/8080", "endpoint", "ns/svc", "TCP", "p"},
	} {
		kind, sp, ok := parseChainName(tc.name)
		if !ok || kind != tc.kind || sp.service.String() != tc.service || sp.protocol != tc.proto || sp.portName != tc.port {
			t.Errorf("%s: %v %q %+v", tc.name, ok, kind, sp)
		}
	}
	for _, name := range []string{"services", "mark-for-masquerade", "service-ips", "service-X-ns/svc/icmp/", "service-X-/svc/tcp/", "endpoint-X", "firewall-X-ns/svc/tcp/p"} {
		if _, _, ok := parseChainName(name); ok {
			t.Errorf("%s parsed as a service chain", name)
		}
	}
}

func verdictAttrs(code int32, chain string) []byte {
	c := make([]byte, 4)
	binary.BigEndian.PutUint32(c, uint32(code))
	attrs := []netlink.Attribute{{Type: unix.NFTA_VERDICT_CODE, Data: c}}
	if chain != "" {
		attrs = append(attrs, netlink.Attribute{Type: unix.NFTA_VERDICT_CHAIN, Data: []byte(chain + "\x00")})
	}
	b, err := netlink.MarshalAttributes(attrs)
	if err != nil {
		panic(err)
	}
	return b
}

func TestDecodeVerdict(t *testing.T) {
	code, chain, ok := decodeVerdict(verdictAttrs(unix.NFT_GOTO, "service-X-a/b/tcp/"))
	if !ok || code != unix.NFT_GOTO || chain != "service-X-a/b/tcp/" {
		t.Errorf("goto: %d %q %v", code, chain, ok)
	}
	if _, _, ok := decodeVerdict(verdictAttrs(1 /* NF_ACCEPT */, "")); !ok {
		t.Error("accept not decoded")
	}
	if _, _, ok := decodeVerdict([]byte{1, 2, 3}); ok {
		t.Error("garbage decoded")
	}
}

func FuzzDecodeVerdict(f *testing.F) {
	f.Add(verdictAttrs(unix.NFT_GOTO, "service-X-a/b/tcp/"))
	f.Add(verdictAttrs(unix.NFT_JUMP, "endpoint-Y-a/b/tcp/__10.0.0.1/80"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		code, chain, ok := decodeVerdict(b)
		if !ok {
			return
		}
		// What decodes encodes back to the same verdict.
		if c2, ch2, ok2 := decodeVerdict(verdictAttrs(code, chain)); !ok2 || c2 != code || ch2 != chain {
			t.Errorf("%x: %d %q does not round-trip: %d %q %v", b, code, chain, c2, ch2, ok2)
		}
	})
}

func FuzzParseChainName(f *testing.F) {
	for _, s := range []string{"service-PFISGYVC-default/web/tcp/", "endpoint-A-ns/svc/tcp/p__10.0.0.1/80", "external-X-a/b/udp/dns", "services"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		kind, sp, ok := parseChainName(name)
		if !ok {
			return
		}
		if kind == "" || sp.service.Namespace == "" || sp.service.Name == "" || (sp.protocol != "TCP" && sp.protocol != "UDP" && sp.protocol != "SCTP") {
			t.Errorf("%q parsed to %q %+v", name, kind, sp)
		}
	})
}
