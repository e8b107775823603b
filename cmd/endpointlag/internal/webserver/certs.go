package webserver

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"k8s.io/utils/clock"
)

// recheckEvery is how often, at most, a handshake reads the certificate files again.
const recheckEvery = time.Second

// certFiles serves the certificate of a pair of PEM files and follows their changes, as
// cert-manager or a Secret volume rewrites them: a handshake reads them again when the last read
// is more than recheckEvery old, and a new pair that loads replaces the one served. A pair that
// does not load (a half-written rotation) is logged and the previous one kept.
type certFiles struct {
	certFile, keyFile string
	clock             clock.PassiveClock
	log               *slog.Logger

	mu              sync.Mutex
	checked         time.Time
	certPEM, keyPEM []byte
	cert            *tls.Certificate
}

func loadCertFiles(certFile, keyFile string, clk clock.PassiveClock, log *slog.Logger) (*certFiles, error) {
	c := &certFiles{certFile: certFile, keyFile: keyFile, clock: clk, log: log}
	if err := c.reload(); err != nil {
		return nil, err
	}
	c.checked = clk.Now()
	return c, nil
}

// GetCertificate is the server's tls.Config.GetCertificate.
func (c *certFiles) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if now := c.clock.Now(); now.Sub(c.checked) >= recheckEvery {
		c.checked = now
		if err := c.reload(); err != nil {
			c.log.Warn("the serving certificate's files changed but do not load; still serving the previous certificate", "err", err)
		}
	}
	return c.cert, nil
}

// reload reads both files and, when either changed, loads the pair.
func (c *certFiles) reload() error {
	certPEM, err := os.ReadFile(c.certFile)
	if err != nil {
		return fmt.Errorf("--web.tls-cert-file: %w", err)
	}
	keyPEM, err := os.ReadFile(c.keyFile)
	if err != nil {
		return fmt.Errorf("--web.tls-key-file: %w", err)
	}
	if bytes.Equal(certPEM, c.certPEM) && bytes.Equal(keyPEM, c.keyPEM) {
		return nil
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return fmt.Errorf("--web.tls-cert-file %s, --web.tls-key-file %s: %w", c.certFile, c.keyFile, err)
	}
	c.certPEM, c.keyPEM, c.cert = certPEM, keyPEM, &cert
	c.log.Info("serving TLS with the certificate of --web.tls-cert-file", "file", c.certFile,
		"subject", cert.Leaf.Subject.String(), "not_after", cert.Leaf.NotAfter, "sha256", fingerprint(cert.Leaf.Raw))
	return nil
}

// selfSigned makes a self-signed serving certificate for this host, valid for a year, as
// Kubernetes components do when given none: clients skip its verification or pin its fingerprint.
func selfSigned(now time.Time, listenHost string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("generating a key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("generating a serial number: %w", err)
	}
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "localhost"
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: fmt.Sprintf("%s@%d", host, now.Unix())},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		DNSNames:              []string{host},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	if host != "localhost" {
		tmpl.DNSNames = append(tmpl.DNSNames, "localhost")
	}
	if ip := net.ParseIP(listenHost); ip != nil && !ip.IsUnspecified() && !ip.IsLoopback() {
		tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("signing the certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("parsing the certificate just made: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, nil
}

// fingerprint is the SHA-256 digest of a DER certificate as `openssl x509 -fingerprint -sha256`
// prints it: upper-case hex bytes joined by colons.
func fingerprint(der []byte) string {
	sum := sha256.Sum256(der)
	parts := make([]string, len(sum))
	for i, b := range sum {
		parts[i] = fmt.Sprintf("%02X", b)
	}
	return strings.Join(parts, ":")
}
