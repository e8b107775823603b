// Package bpf holds endpointlag's eBPF programs: endpointlag.c, TC classifiers that count the
// traffic still reaching this node's terminating and deleted pods, and the Go bindings and object
// file bpf2go generates from it. The generated files are committed; `make generate` rebuilds them
// with Debian's clang and `make check-generate` fails when they are stale.
//
// The kernel headers come from the build host (linux-libc-dev, libbpf-dev), except the
// architecture's asm/ headers: those in include/asm are written for the BPF target (64-bit,
// little-endian) and take the place of the host's multiarch directory
// (/usr/include/x86_64-linux-gnu, /usr/include/aarch64-linux-gnu, ...), so that an amd64 and an
// arm64 build host compile the same object.
//
// Kernel minimum: 5.8 (BPF ring buffer); the programs' read-only settings are .rodata globals
// (5.2). Attaching uses TCX links from 6.6 and a clsact qdisc's filters before that.
package bpf

//go:generate go tool bpf2go -tags linux -target bpfel -go-package bpf -type event -type counters -type ratelimit -type recent_syn Endpointlag endpointlag.c -- -I./include -Wall -Werror
