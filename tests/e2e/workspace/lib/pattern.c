#include "lib/pattern.h"

void pattern_init(pattern_stream *stream, uint64_t seed) {
  /* xorshift must not start from zero, so mix in a fixed odd constant. */
  stream->state = seed ^ UINT64_C(0x9e3779b97f4a7c15);
  if (stream->state == 0) {
    stream->state = 1;
  }
}

static uint64_t pattern_next(pattern_stream *stream) {
  uint64_t x = stream->state;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  stream->state = x;
  return x * UINT64_C(0x2545f4914f6cdd1d);
}

void pattern_fill(pattern_stream *stream, unsigned char *out, size_t size) {
  /* One 64-bit word per byte keeps the stream independent of how callers split it. */
  for (size_t i = 0; i < size; i++) {
    out[i] = (unsigned char)(pattern_next(stream) >> 56);
  }
}
