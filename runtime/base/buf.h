/* A growing, NUL-terminated byte buffer: what the servers collect a request
 * line, headers and body in. Zero-initialized is empty. */
#ifndef SEGUE_BUF_H
#define SEGUE_BUF_H
#include <stddef.h>

typedef struct sg__buf {
  char *p;  /* NULL while empty; else p[len] == '\0' */
  size_t len, cap;
} sg__buf;

/* Appends n bytes (n may be 0: the buffer then exists, holding ""). 0 or
 * SG_ENOMEM (the buffer is unchanged). */
int sg__buf_append(sg__buf *b, const void *s, size_t n);
/* Empties the buffer for the next use: it holds "" and keeps its memory,
 * unless that grew past `keep` bytes, which is freed (a large request does
 * not stay allocated on a connection that waits for the next one). */
void sg__buf_clear(sg__buf *b, size_t keep);
/* Frees the memory; the buffer is empty again. */
void sg__buf_free(sg__buf *b);

#endif
