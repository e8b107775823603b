/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/* asm/types.h for the BPF target (64-bit, little-endian), the same on every build host: see
 * bpf/doc.go. */
#ifndef _ENDPOINTLAG_ASM_TYPES_H
#define _ENDPOINTLAG_ASM_TYPES_H
#include <asm-generic/types.h>
#endif
