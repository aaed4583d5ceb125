#include <stdio.h>
#include <string.h>

#include "lib/pattern.h"

int main(void) {
  pattern_stream whole_stream, split_stream;
  unsigned char whole[1000], split[1000];

  pattern_init(&whole_stream, 7);
  pattern_fill(&whole_stream, whole, sizeof whole);

  pattern_init(&split_stream, 7);
  pattern_fill(&split_stream, split, 333);
  pattern_fill(&split_stream, split + 333, sizeof split - 333);

  if (memcmp(whole, split, sizeof whole) != 0) {
    fprintf(stderr, "pattern_fill depends on how the output is split\n");
    return 1;
  }

  int distinct = 0;
  int seen[256] = {0};
  for (size_t i = 0; i < sizeof whole; i++) {
    if (!seen[whole[i]]) {
      seen[whole[i]] = 1;
      distinct++;
    }
  }
  if (distinct < 200) {
    fprintf(stderr, "pattern has only %d distinct byte values in 1000 bytes\n", distinct);
    return 1;
  }
  printf("pattern_test: passed\n");
  return 0;
}
