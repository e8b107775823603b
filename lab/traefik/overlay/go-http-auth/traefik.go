package auth

// The two functions Traefik's fork of this package (github.com/containous/go-http-auth, not
// served by the Go module proxy) has and v0.4.0 lacks. lab/traefik/build.sh adds this file to a
// copy of v0.4.0; it is the lab's own code, not the fork's.

import (
	"fmt"
	"net/http"
	"strings"
	"time"
)

// CheckSecret reports whether password matches secret, an htpasswd hash: MD5-crypt
// ("$apr1$…", "$1$…"), SHA-1 ("{SHA}…") or bcrypt ("$2y$…"), chosen by the secret's prefix as
// BasicAuth.CheckAuth chooses.
func CheckSecret(password, secret string) bool {
	compare := compareFuncs[0].compare
	for _, cmp := range compareFuncs[1:] {
		if strings.HasPrefix(secret, cmp.prefix) {
			compare = cmp.compare
			break
		}
	}
	return compare([]byte(secret), []byte(password)) == nil
}

// RequireAuthStale answers as RequireAuth does, with "stale=true" in the challenge: the
// client's nonce was known but expired or out of order, so it may retry with a new nonce and
// the same credentials (RFC 7616, section 3.3).
func (a *DigestAuth) RequireAuthStale(w http.ResponseWriter, r *http.Request) {
	a.mutex.Lock()
	if a.clients == nil {
		a.clients = map[string]*digest_client{}
	}
	if len(a.clients) > a.ClientCacheSize+a.ClientCacheTolerance {
		a.Purge(a.ClientCacheTolerance * 2)
	}
	nonce := RandomKey()
	a.clients[nonce] = &digest_client{last_seen: time.Now().UnixNano()}
	a.mutex.Unlock()
	h := a.Headers.V()
	w.Header().Set(contentType, h.UnauthContentType)
	w.Header().Set(h.Authenticate, fmt.Sprintf(`Digest realm="%s", nonce="%s", opaque="%s", algorithm="MD5", qop="auth", stale=true`, a.Realm, nonce, a.Opaque))
	w.WriteHeader(h.UnauthCode)
	_, _ = w.Write([]byte(h.UnauthResponse))
}
