package webserver

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/clock"
)

// How long answers are kept, and how many: the defaults of Kubernetes components' delegated
// authentication and authorization (10 s, both outcomes).
const (
	authnTTL      = 10 * time.Second
	authzTTL      = 10 * time.Second
	cacheEntries  = 4096
	reviewTimeout = 10 * time.Second
)

// APIGroup is the group of the virtual resources the /api/v1/... endpoints are authorized as:
// GET /api/v1/records is "get records.endpointlag.dev", POST /api/v1/push "create
// push.endpointlag.dev", GET /api/v1/pods/<uid> "get pods.endpointlag.dev named <uid>". Not as
// non-resource URLs: Kubernetes' built-in role system:discovery lets every authenticated user
// get the non-resource URLs /api/*, so any token at all would have read the records.
const APIGroup = "endpointlag.dev"

// resourceVerbs maps an HTTP method to the verb the API server gives a request for a resource.
var resourceVerbs = map[string]string{"get": "get", "head": "get", "post": "create", "put": "update", "patch": "patch", "delete": "delete"}

// attributes are what a request is authorized as: a resource of APIGroup for the API paths, a
// non-resource URL (its path and lower-case method) for any other.
func attributes(verb, path string) (*authorizationv1.ResourceAttributes, *authorizationv1.NonResourceAttributes) {
	rest, ok := strings.CutPrefix(path, "/api/")
	if !ok {
		return nil, &authorizationv1.NonResourceAttributes{Path: path, Verb: verb}
	}
	ra := &authorizationv1.ResourceAttributes{Group: APIGroup, Verb: resourceVerbs[verb]}
	if ra.Verb == "" {
		ra.Verb = verb
	}
	parts := strings.SplitN(rest, "/", 3)
	ra.Version = parts[0]
	if len(parts) > 1 {
		ra.Resource = parts[1]
	}
	if len(parts) > 2 {
		ra.Name = parts[2]
	}
	return ra, nil
}

// openPaths are served to anyone: the kubelet's probes carry no token.
var openPaths = map[string]bool{"/healthz": true, "/readyz": true}

// errUnauthenticated says the request carries no token, or one the TokenReview rejected.
var errUnauthenticated = errors.New("unauthenticated")

// delegated guards a handler the way Kubernetes components guard theirs: the request's bearer
// token is checked with a TokenReview, then the request is authorized with a SubjectAccessReview
// of its path and verb as a non-resource URL — the attributes the API server gives such a
// request, so that RBAC's nonResourceURLs rules apply to it — or, for the API paths, as a
// resource of APIGroup (see attributes).
type delegated struct {
	client kubernetes.Interface
	next   http.Handler
	log    *slog.Logger
	// users maps a digest of a token to what its TokenReview said (nil: not authenticated).
	users *ttlCache[*authenticationv1.UserInfo]
	// decisions maps a digest of (user, verb, path) to what its SubjectAccessReview said.
	decisions *ttlCache[decision]
}

type decision struct {
	allowed bool
	reason  string
}

func newDelegated(client kubernetes.Interface, next http.Handler, clk clock.PassiveClock, log *slog.Logger) *delegated {
	return &delegated{client: client, next: next, log: log,
		users:     newTTLCache[*authenticationv1.UserInfo](clk, authnTTL, cacheEntries),
		decisions: newTTLCache[decision](clk, authzTTL, cacheEntries),
	}
}

func (d *delegated) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if openPaths[r.URL.Path] {
		d.next.ServeHTTP(w, r)
		return
	}
	verb := strings.ToLower(r.Method)
	user, err := d.authenticate(r.Context(), r.Header.Get("Authorization"))
	switch {
	case errors.Is(err, errUnauthenticated):
		w.Header().Set("WWW-Authenticate", `Bearer realm="endpointlag"`)
		http.Error(w, "Unauthorized: send a Kubernetes bearer token (Authorization: Bearer <token>)", http.StatusUnauthorized)
		return
	case err != nil:
		d.log.Error("cannot authenticate a request: the API server did not answer the TokenReview", "path", r.URL.Path, "verb", verb, "err", err)
		http.Error(w, "Service Unavailable: the Kubernetes API server cannot check the token now", http.StatusServiceUnavailable)
		return
	}
	ra, nra := attributes(verb, r.URL.Path)
	if ra != nil {
		verb = ra.Verb
	}
	dec, err := d.authorize(r.Context(), user, ra, nra)
	if err != nil {
		d.log.Error("cannot authorize a request: the API server did not answer the SubjectAccessReview", "user", user.Username, "path", r.URL.Path, "verb", verb, "err", err)
		http.Error(w, "Service Unavailable: the Kubernetes API server cannot authorize the request now", http.StatusServiceUnavailable)
		return
	}
	if !dec.allowed {
		d.log.Debug("request forbidden", "user", user.Username, "path", r.URL.Path, "verb", verb, "reason", dec.reason)
		msg := fmt.Sprintf("Forbidden (user=%s, verb=%s, path=%s)", user.Username, verb, r.URL.Path)
		if dec.reason != "" {
			msg += ": " + dec.reason
		}
		http.Error(w, msg, http.StatusForbidden)
		return
	}
	d.next.ServeHTTP(w, r)
}

// authenticate returns who the bearer token of an Authorization header belongs to.
func (d *delegated) authenticate(ctx context.Context, header string) (*authenticationv1.UserInfo, error) {
	scheme, token, ok := strings.Cut(header, " ")
	token = strings.TrimSpace(token)
	if !ok || !strings.EqualFold(scheme, "Bearer") || token == "" {
		return nil, errUnauthenticated
	}
	sum := sha256.Sum256([]byte(token))
	key := hex.EncodeToString(sum[:])
	if user, ok := d.users.get(key); ok {
		if user == nil {
			return nil, errUnauthenticated
		}
		return user, nil
	}
	ctx, cancel := context.WithTimeout(ctx, reviewTimeout)
	defer cancel()
	review, err := d.client.AuthenticationV1().TokenReviews().Create(ctx,
		&authenticationv1.TokenReview{Spec: authenticationv1.TokenReviewSpec{Token: token}}, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("creating a TokenReview: %w", err)
	}
	if !review.Status.Authenticated {
		d.users.set(key, nil)
		if review.Status.Error != "" {
			d.log.Debug("token rejected", "reason", review.Status.Error)
		}
		return nil, errUnauthenticated
	}
	user := review.Status.User
	d.users.set(key, &user)
	return &user, nil
}

// authorize asks whether user may do what the attributes say.
func (d *delegated) authorize(ctx context.Context, user *authenticationv1.UserInfo, ra *authorizationv1.ResourceAttributes, nra *authorizationv1.NonResourceAttributes) (decision, error) {
	spec := authorizationv1.SubjectAccessReviewSpec{
		User: user.Username, UID: user.UID, Groups: user.Groups,
		ResourceAttributes: ra, NonResourceAttributes: nra,
	}
	if len(user.Extra) > 0 {
		spec.Extra = make(map[string]authorizationv1.ExtraValue, len(user.Extra))
		for k, v := range user.Extra {
			spec.Extra[k] = authorizationv1.ExtraValue(v)
		}
	}
	// The spec marshals deterministically (map keys sorted), so its digest identifies the question.
	b, err := json.Marshal(spec)
	if err != nil {
		return decision{}, fmt.Errorf("encoding the SubjectAccessReview: %w", err)
	}
	sum := sha256.Sum256(b)
	key := hex.EncodeToString(sum[:])
	if dec, ok := d.decisions.get(key); ok {
		return dec, nil
	}
	ctx, cancel := context.WithTimeout(ctx, reviewTimeout)
	defer cancel()
	review, err := d.client.AuthorizationV1().SubjectAccessReviews().Create(ctx,
		&authorizationv1.SubjectAccessReview{Spec: spec}, metav1.CreateOptions{})
	if err != nil {
		return decision{}, fmt.Errorf("creating a SubjectAccessReview: %w", err)
	}
	if review.Status.EvaluationError != "" {
		d.log.Warn("the SubjectAccessReview reported an evaluation error", "user", user.Username, "resource", ra, "non_resource", nra,
			"allowed", review.Status.Allowed, "err", review.Status.EvaluationError)
	}
	dec := decision{allowed: review.Status.Allowed && !review.Status.Denied, reason: review.Status.Reason}
	d.decisions.set(key, dec)
	return dec, nil
}
