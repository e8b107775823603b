/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/* asm/byteorder.h for the BPF target (64-bit, little-endian), the same on every build host: see
 * bpf/doc.go. */
#ifndef _ENDPOINTLAG_ASM_BYTEORDER_H
#define _ENDPOINTLAG_ASM_BYTEORDER_H
#include <linux/byteorder/little_endian.h>
#endif
