/* Usage: fnvsum FILE...
 * Prints one line "HASH  FILE" per file, HASH being the 64-bit FNV-1a in hex. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "lib/fnv.h"

static int print_hash(const char *path) {
  FILE *in = fopen(path, "rb");
  if (in == NULL) {
    fprintf(stderr, "cannot open %s: %s\n", path, strerror(errno));
    return 1;
  }
  uint64_t hash = FNV1A64_OFFSET_BASIS;
  unsigned char buffer[65536];
  size_t count;
  while ((count = fread(buffer, 1, sizeof buffer, in)) > 0) {
    hash = fnv1a64_update(hash, buffer, count);
  }
  int failed = ferror(in);
  fclose(in);
  if (failed) {
    fprintf(stderr, "read from %s failed\n", path);
    return 1;
  }
  printf("%016llx  %s\n", (unsigned long long)hash, path);
  return 0;
}

int main(int argc, char **argv) {
  int failures = 0;
  for (int i = 1; i < argc; i++) {
    failures += print_hash(argv[i]);
  }
  return failures == 0 ? 0 : 1;
}
