// Package dns replaces lego's registry of DNS-01 challenge providers in the lab's Traefik build.
// Lego's own package imports its ~200 provider packages, which pull in SDK modules the Go module
// proxy does not serve; the lab's Traefik never asks for a certificate, so this package keeps the
// one function Traefik calls and no provider. lab/traefik/build.sh puts it in place of lego's
// providers/dns in a copy of lego, with the provider subpackages removed.
package dns

import (
	"fmt"

	"github.com/go-acme/lego/v5/challenge"
)

// NewDNSChallengeProviderByName fails for every name: the lab's Traefik has no DNS provider.
func NewDNSChallengeProviderByName(name string) (challenge.Provider, error) {
	return nil, fmt.Errorf("DNS challenge provider %q: the lab's Traefik is built without DNS providers", name)
}
