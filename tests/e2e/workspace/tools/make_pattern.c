/* Usage: make_pattern OUTPUT SIZE_BYTES SEED
 * Writes SIZE_BYTES bytes of the pattern stream started from SEED to OUTPUT. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/pattern.h"

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s OUTPUT SIZE_BYTES SEED\n", argv[0]);
    return 2;
  }
  char *end;
  unsigned long long remaining = strtoull(argv[2], &end, 10);
  if (*end != '\0') {
    fprintf(stderr, "invalid size in bytes: %s\n", argv[2]);
    return 2;
  }
  unsigned long long seed = strtoull(argv[3], &end, 10);
  if (*end != '\0') {
    fprintf(stderr, "invalid seed: %s\n", argv[3]);
    return 2;
  }

  FILE *out = fopen(argv[1], "wb");
  if (out == NULL) {
    fprintf(stderr, "cannot open %s: %s\n", argv[1], strerror(errno));
    return 1;
  }

  pattern_stream stream;
  pattern_init(&stream, seed);
  unsigned char buffer[65536];
  while (remaining > 0) {
    size_t chunk = remaining < sizeof buffer ? (size_t)remaining : sizeof buffer;
    pattern_fill(&stream, buffer, chunk);
    if (fwrite(buffer, 1, chunk, out) != chunk) {
      fprintf(stderr, "write to %s failed: %s\n", argv[1], strerror(errno));
      return 1;
    }
    remaining -= chunk;
  }
  if (fclose(out) != 0) {
    fprintf(stderr, "closing %s failed: %s\n", argv[1], strerror(errno));
    return 1;
  }
  return 0;
}
