/* 64-bit FNV-1a hash, used to fingerprint build outputs. */
#ifndef BGRID_E2E_LIB_FNV_H_
#define BGRID_E2E_LIB_FNV_H_

#include <stddef.h>
#include <stdint.h>

#define FNV1A64_OFFSET_BASIS UINT64_C(0xcbf29ce484222325)

/* Return the FNV-1a hash of data[0..size) continued from hash. Pass FNV1A64_OFFSET_BASIS
 * as hash to start a new one. */
uint64_t fnv1a64_update(uint64_t hash, const unsigned char *data, size_t size);

#endif
