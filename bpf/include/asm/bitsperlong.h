/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/* asm/bitsperlong.h for the BPF target (64-bit, little-endian), the same on every build host: see
 * bpf/doc.go. */
#ifndef _ENDPOINTLAG_ASM_BITSPERLONG_H
#define _ENDPOINTLAG_ASM_BITSPERLONG_H
#define __BITS_PER_LONG 64
#include <asm-generic/bitsperlong.h>
#endif
