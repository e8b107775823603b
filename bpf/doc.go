// Package bpf holds endpointlag's eBPF programs: endpointlag.c, TC classifiers that count the
// traffic still reaching this node's terminating and deleted pods, and the Go bindings and object
// file bpf2go generates from it. The generated files are committed; `make generate` rebuilds them
// with Debian's clang and `make check-generate` fails when they are stale.
package bpf

//go:generate go tool bpf2go -tags linux -target bpfel -go-package bpf -type event -type counters -type ratelimit Endpointlag endpointlag.c -- -I/usr/include/x86_64-linux-gnu -Wall -Werror
