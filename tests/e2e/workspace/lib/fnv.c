#include "lib/fnv.h"

#define FNV1A64_PRIME UINT64_C(0x100000001b3)

uint64_t fnv1a64_update(uint64_t hash, const unsigned char *data, size_t size) {
  for (size_t i = 0; i < size; i++) {
    hash ^= data[i];
    hash *= FNV1A64_PRIME;
  }
  return hash;
}
