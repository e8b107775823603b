package testutil

import (
	"strings"
	"sync"

	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// ReviewAPI is a fake clientset that answers TokenReviews from its tokens and
// SubjectAccessReviews from its rules, the way the API server and RBAC would, and records what it
// was asked.
type ReviewAPI struct {
	*fake.Clientset
	tokens map[string]authenticationv1.UserInfo
	// rules maps a user name to the "verb path" it may (a path ending in * is a prefix, as in
	// RBAC's nonResourceURLs) or the "verb group/resource" (resource * for any).
	rules map[string][]string

	mu           sync.Mutex
	fail         error // when set, every review fails with it
	tokenReviews []string
	sars         []authorizationv1.SubjectAccessReviewSpec
}

// NewReviewAPI answers the tokens' reviews with their users and the users' requests by rules.
func NewReviewAPI(tokens map[string]authenticationv1.UserInfo, rules map[string][]string) *ReviewAPI {
	f := &ReviewAPI{Clientset: fake.NewClientset(), tokens: tokens, rules: rules}
	f.PrependReactor("create", "tokenreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		tr := a.(k8stesting.CreateAction).GetObject().(*authenticationv1.TokenReview).DeepCopy()
		f.mu.Lock()
		defer f.mu.Unlock()
		f.tokenReviews = append(f.tokenReviews, tr.Spec.Token)
		if f.fail != nil {
			return true, nil, f.fail
		}
		if u, ok := f.tokens[tr.Spec.Token]; ok {
			tr.Status = authenticationv1.TokenReviewStatus{Authenticated: true, User: u}
		} else {
			tr.Status = authenticationv1.TokenReviewStatus{Error: "invalid bearer token"}
		}
		return true, tr, nil
	})
	f.PrependReactor("create", "subjectaccessreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		sar := a.(k8stesting.CreateAction).GetObject().(*authorizationv1.SubjectAccessReview).DeepCopy()
		f.mu.Lock()
		defer f.mu.Unlock()
		f.sars = append(f.sars, sar.Spec)
		if f.fail != nil {
			return true, nil, f.fail
		}
		nr, ra := sar.Spec.NonResourceAttributes, sar.Spec.ResourceAttributes
		for _, rule := range f.rules[sar.Spec.User] {
			verb, path, _ := strings.Cut(rule, " ")
			group, resource, isResource := strings.Cut(path, "/")
			nonResourceOK := nr != nil && nr.Verb == verb && (nr.Path == path || strings.HasSuffix(path, "*") && strings.HasPrefix(nr.Path, strings.TrimSuffix(path, "*")))
			resourceOK := isResource && group != "" && ra != nil && ra.Verb == verb && ra.Group == group && (resource == "*" || ra.Resource == resource)
			if nonResourceOK || resourceOK {
				sar.Status = authorizationv1.SubjectAccessReviewStatus{Allowed: true, Reason: "RBAC: allowed by ClusterRoleBinding"}
				return true, sar, nil
			}
		}
		return true, sar, nil
	})
	return f
}

// Seen returns the tokens reviewed and the SubjectAccessReviews asked so far, in order.
func (f *ReviewAPI) Seen() ([]string, []authorizationv1.SubjectAccessReviewSpec) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.tokenReviews...), append([]authorizationv1.SubjectAccessReviewSpec(nil), f.sars...)
}

// Calls returns how many TokenReviews and SubjectAccessReviews were asked so far.
func (f *ReviewAPI) Calls() (int, int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.tokenReviews), len(f.sars)
}

// SetFail makes every review fail with err from now on; nil makes them answer again.
func (f *ReviewAPI) SetFail(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fail = err
}
