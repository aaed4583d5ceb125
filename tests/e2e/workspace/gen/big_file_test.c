/* Usage: big_file_test FILE SIZE_BYTES SEED
 * Checks that FILE contains exactly SIZE_BYTES bytes of the pattern stream started from SEED. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/pattern.h"

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s FILE SIZE_BYTES SEED\n", argv[0]);
    return 2;
  }
  unsigned long long expected_size = strtoull(argv[2], NULL, 10);
  unsigned long long seed = strtoull(argv[3], NULL, 10);

  FILE *in = fopen(argv[1], "rb");
  if (in == NULL) {
    fprintf(stderr, "cannot open %s: %s\n", argv[1], strerror(errno));
    return 1;
  }

  pattern_stream stream;
  pattern_init(&stream, seed);
  unsigned char actual[65536], expected[65536];
  unsigned long long offset = 0;
  size_t count;
  while ((count = fread(actual, 1, sizeof actual, in)) > 0) {
    pattern_fill(&stream, expected, count);
    for (size_t i = 0; i < count; i++) {
      if (actual[i] != expected[i]) {
        fprintf(stderr, "%s differs from the pattern at byte offset %llu\n", argv[1], offset + i);
        return 1;
      }
    }
    offset += count;
  }
  fclose(in);

  if (offset != expected_size) {
    fprintf(stderr, "%s has %llu bytes, expected %llu\n", argv[1], offset, expected_size);
    return 1;
  }
  printf("big_file_test: %llu bytes match the pattern\n", offset);
  return 0;
}
