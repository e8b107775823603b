// Package ext stands in for Traefik's github.com/traefik/traefik/dynamic/ext, a module of
// Traefik's own repository that is not published on the Go module proxy. Traefik embeds its two
// types inline in its dynamic configuration, where they add nothing the lab uses; empty structs
// keep that configuration as it is otherwise.
package ext

// HTTP is embedded in Traefik's dynamic.HTTPConfiguration.
type HTTP struct{}

// Router is embedded in Traefik's dynamic.Router.
type Router struct{}
