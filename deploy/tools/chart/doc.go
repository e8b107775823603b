// Package chart holds the tests of the Helm chart deploy/helm/endpointlag and of the kustomize
// manifests made from it (deploy/base, deploy/overlays). They run the helm that make builds
// (HELM=...; skipped without it) and kubectl kustomize.
package chart
