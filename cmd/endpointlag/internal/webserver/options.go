// Package webserver serves endpointlag's HTTP endpoints (the daemon's and the aggregator's) in one
// of three ways: in plain HTTP to anyone; over TLS with Kubernetes' delegated authentication and
// authorization (a TokenReview of the bearer token, a SubjectAccessReview of the path and verb),
// as Kubernetes components and kube-rbac-proxy guard theirs; or as a Prometheus exporter-toolkit
// web configuration file says (TLS, basic auth), for use outside Kubernetes. docs/security.md
// describes them.
package webserver

import (
	"errors"
	"fmt"

	"github.com/spf13/pflag"
)

// The values of --web.auth.
const (
	AuthNone       = "none"
	AuthKubernetes = "kubernetes"
)

// Options say how the endpoints are served; Bind binds them to the --web.* flags.
type Options struct {
	// Auth is AuthNone or AuthKubernetes.
	Auth string
	// TLSCertFile and TLSKeyFile are a PEM certificate and its key, followed as they change.
	TLSCertFile string
	TLSKeyFile  string
	// ConfigFile is an exporter-toolkit web configuration file.
	ConfigFile string
}

// Bind binds the options to the --web.* flags of fs, besides --web.listen-address.
func (o *Options) Bind(fs *pflag.FlagSet) {
	fs.StringVar(&o.Auth, "web.auth", AuthNone,
		"who may use the HTTP endpoints: none (anyone), or kubernetes: the request's bearer token is checked with a TokenReview and the request authorized with a SubjectAccessReview, "+
			"as Kubernetes components do: /api/v1/<resource> as that resource of the API group "+APIGroup+" (GET as get, POST as create), any other path, such as /metrics, "+
			"as a non-resource URL with the lower-case method as the verb, so RBAC rules on "+APIGroup+" and nonResourceURLs grant access; "+
			"/healthz and /readyz stay open for the kubelet's probes. kubernetes is always served over TLS (--web.tls-cert-file, else a self-signed certificate made at start) "+
			"and needs RBAC create on tokenreviews and subjectaccessreviews (the ClusterRole system:auth-delegator); see docs/security.md")
	fs.StringVar(&o.TLSCertFile, "web.tls-cert-file", "",
		"serve HTTPS with this PEM certificate (chain); the file is read again when it changes, as cert-manager or a Secret volume rotates it. "+
			"Empty: plain HTTP, or with --web.auth=kubernetes a self-signed certificate made at start, logged with its SHA-256 fingerprint")
	fs.StringVar(&o.TLSKeyFile, "web.tls-key-file", "", "the PEM private key of --web.tls-cert-file, read again with it")
	fs.StringVar(&o.ConfigFile, "web.config.file", "",
		"a Prometheus exporter-toolkit web configuration file (tls_server_config, basic_auth_users with bcrypt hashes, http_server_config) to serve with TLS and basic auth outside Kubernetes; "+
			"read again at each request and handshake; basic auth then covers every path, /healthz and /readyz included. Not with --web.auth=kubernetes nor --web.tls-*")
}

// Validate reports every combination of settings that is wrong, naming the flag. The files they
// name are read by New.
func (o *Options) Validate() error {
	var errs []error
	if o.Auth != AuthNone && o.Auth != AuthKubernetes {
		errs = append(errs, fmt.Errorf("--web.auth: %q is neither %s nor %s", o.Auth, AuthNone, AuthKubernetes))
	}
	if (o.TLSCertFile == "") != (o.TLSKeyFile == "") {
		errs = append(errs, errors.New("--web.tls-cert-file and --web.tls-key-file go together: give both or neither"))
	}
	if o.ConfigFile != "" {
		if o.Auth == AuthKubernetes {
			errs = append(errs, errors.New("--web.config.file and --web.auth=kubernetes are mutually exclusive: the file's basic_auth_users are for use outside Kubernetes, --web.auth=kubernetes checks Kubernetes tokens; choose one"))
		}
		if o.TLSCertFile != "" || o.TLSKeyFile != "" {
			errs = append(errs, errors.New("--web.config.file and --web.tls-cert-file/--web.tls-key-file are mutually exclusive: set cert_file and key_file in the file's tls_server_config"))
		}
	}
	return errors.Join(errs...)
}
