#include <stdio.h>
#include <string.h>

#include "lib/fnv.h"

static int check(const char *input, uint64_t expected) {
  uint64_t actual = fnv1a64_update(FNV1A64_OFFSET_BASIS, (const unsigned char *)input, strlen(input));
  if (actual != expected) {
    fprintf(stderr, "fnv1a64(\"%s\") = %016llx, expected %016llx\n", input,
            (unsigned long long)actual, (unsigned long long)expected);
    return 1;
  }
  return 0;
}

int main(void) {
  int failures = 0;
  /* Published FNV-1a 64-bit test vectors. */
  failures += check("", UINT64_C(0xcbf29ce484222325));
  failures += check("a", UINT64_C(0xaf63dc4c8601ec8c));
  failures += check("foobar", UINT64_C(0x85944171f73967e8));
  printf("fnv_test: %d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
