#include "buf.h"

#include <stdlib.h>
#include <string.h>

#include "segue.h"

int sg__buf_append(sg__buf *b, const void *s, size_t n) {
  if (b->cap - b->len <= n) {
    size_t cap = b->cap ? b->cap : 64;
    while (cap - b->len <= n) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) return SG_ENOMEM;
    b->p = p;
    b->cap = cap;
  }
  if (n) memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = '\0';
  return 0;
}

void sg__buf_clear(sg__buf *b, size_t keep) {
  if (b->cap > keep) {
    sg__buf_free(b);
  } else if (b->p) {
    b->len = 0;
    b->p[0] = '\0';
  }
}

void sg__buf_free(sg__buf *b) {
  free(b->p);
  b->p = NULL;
  b->len = b->cap = 0;
}
