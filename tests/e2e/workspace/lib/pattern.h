/* A deterministic pseudo-random byte stream (xorshift64*), so that large test files
 * have no repeating blocks that would hide a transfer at the wrong offset. */
#ifndef BGRID_E2E_LIB_PATTERN_H_
#define BGRID_E2E_LIB_PATTERN_H_

#include <stddef.h>
#include <stdint.h>

typedef struct {
  uint64_t state;
} pattern_stream;

/* Start a stream. Any seed gives a valid stream, and equal seeds give equal streams. */
void pattern_init(pattern_stream *stream, uint64_t seed);

/* Write the next size bytes of the stream to out. */
void pattern_fill(pattern_stream *stream, unsigned char *out, size_t size);

#endif
