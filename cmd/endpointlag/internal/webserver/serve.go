package webserver

import (
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	toolkit "github.com/prometheus/exporter-toolkit/web"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/clock"
)

// Server serves an http.Server's handler as its Options say.
type Server struct {
	opts Options
	// tls is the TLS configuration of --web.tls-* or of the self-signed certificate; nil for plain
	// HTTP and for the web configuration file, which brings its own.
	tls *tls.Config
	// client is asked the TokenReviews and SubjectAccessReviews of --web.auth=kubernetes.
	client kubernetes.Interface
	clock  clock.PassiveClock
	log    *slog.Logger
}

// New prepares serving as opts say (Validate them first): it reads the files they name, so that a
// mistake stops the start, not the first request. client, the Kubernetes API, is needed by
// --web.auth=kubernetes alone; listenHost, the host part of the listen address, goes into a
// self-signed certificate besides this host's name and the loopback addresses.
func New(opts Options, listenHost string, client kubernetes.Interface, clk clock.PassiveClock, log *slog.Logger) (*Server, error) {
	s := &Server{opts: opts, client: client, clock: clk, log: log.With("component", "web")}
	if opts.Auth == AuthKubernetes && client == nil {
		return nil, errors.New("--web.auth=kubernetes needs the Kubernetes API (--kubeconfig, or the in-cluster service account)")
	}
	switch {
	case opts.ConfigFile != "":
		if err := toolkit.Validate(opts.ConfigFile); err != nil {
			return nil, fmt.Errorf("--web.config.file %s: %w", opts.ConfigFile, err)
		}
	case opts.TLSCertFile != "":
		files, err := loadCertFiles(opts.TLSCertFile, opts.TLSKeyFile, clk, s.log)
		if err != nil {
			return nil, err
		}
		s.tls = &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: files.GetCertificate}
	case opts.Auth == AuthKubernetes:
		cert, err := selfSigned(time.Now(), listenHost) // the wall clock: clients check its validity against theirs
		if err != nil {
			return nil, fmt.Errorf("--web.auth=kubernetes without --web.tls-cert-file: making a self-signed certificate: %w", err)
		}
		s.tls = &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}}
		s.log.Info("serving TLS with a self-signed certificate made at start (no --web.tls-cert-file): clients skip its verification or pin it by this fingerprint",
			"subject", cert.Leaf.Subject.String(), "not_after", cert.Leaf.NotAfter, "sha256", fingerprint(cert.Leaf.Raw))
	}
	return s, nil
}

// Serve serves srv's handler on ln until srv is shut down, as http.Server.Serve does: plainly,
// over TLS, behind delegated Kubernetes authentication and authorization, or as the web
// configuration file says.
func (s *Server) Serve(ln net.Listener, srv *http.Server) error {
	if srv.ErrorLog == nil {
		// Failed handshakes and the like, which net/http would print on the standard logger.
		srv.ErrorLog = slog.NewLogLogger(s.log.Handler(), slog.LevelWarn)
	}
	if s.opts.ConfigFile != "" {
		path := s.opts.ConfigFile
		return toolkit.Serve(ln, srv, &toolkit.FlagConfig{WebConfigFile: &path}, s.log)
	}
	if s.opts.Auth == AuthKubernetes {
		srv.Handler = newDelegated(s.client, srv.Handler, s.clock, s.log)
	}
	if s.tls == nil {
		return srv.Serve(ln)
	}
	srv.TLSConfig = s.tls
	s.log.Info("serving HTTPS", "address", ln.Addr().String(), "auth", s.opts.Auth)
	return srv.ServeTLS(ln, "", "")
}
