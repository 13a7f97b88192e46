/* id -> pointer, chained buckets under a keyed hash (idmap.h). */
#include "idmap.h"

#include <stdlib.h>
#include <string.h>

#include <sodium.h>

#include "segue.h"

#define FIRST_BUCKETS 16

int sg__idmap_init(sg__idmap *m) {
  memset(m, 0, sizeof *m);
  if (sodium_init() < 0 || !(m->buckets = calloc(FIRST_BUCKETS, sizeof *m->buckets)))
    return SG_ENOMEM;
  m->mask = FIRST_BUCKETS - 1;
  randombytes_buf(m->key, sizeof m->key);
  return 0;
}

void sg__idmap_free(sg__idmap *m) {
  for (size_t i = 0; m->buckets && i <= m->mask; i++) {
    sg__idmap_entry *e = m->buckets[i];
    while (e) {
      sg__idmap_entry *next = e->next;
      free(e);
      e = next;
    }
  }
  free(m->buckets);
  m->buckets = NULL;
  m->mask = m->count = 0;
}

uint64_t sg__id_hash(const unsigned char key[16], const char *id) {
  unsigned char h[crypto_shorthash_BYTES];
  uint64_t v;
  crypto_shorthash(h, (const unsigned char *)id, strlen(id), key);
  memcpy(&v, h, sizeof v);
  return v;
}

static uint64_t hash_of(const sg__idmap *m, const char *id) { return sg__id_hash(m->key, id); }

static sg__idmap_entry **slot_of(const sg__idmap *m, const char *id, uint64_t h) {
  sg__idmap_entry **pp = &m->buckets[h & m->mask];
  while (*pp && ((*pp)->hash != h || strcmp((*pp)->id, id) != 0)) pp = &(*pp)->next;
  return pp;
}

void *sg__idmap_get(const sg__idmap *m, const char *id) {
  if (!m->buckets || !id) return NULL;
  sg__idmap_entry *e = *slot_of(m, id, hash_of(m, id));
  return e ? e->value : NULL;
}

/* Twice the buckets; a failed allocation only leaves the chains longer. */
static void grow(sg__idmap *m) {
  size_t n = (m->mask + 1) * 2;
  sg__idmap_entry **b = calloc(n, sizeof *b);
  if (!b) return;
  for (size_t i = 0; i <= m->mask; i++) {
    sg__idmap_entry *e = m->buckets[i];
    while (e) {
      sg__idmap_entry *next = e->next;
      e->next = b[e->hash & (n - 1)];
      b[e->hash & (n - 1)] = e;
      e = next;
    }
  }
  free(m->buckets);
  m->buckets = b;
  m->mask = n - 1;
}

int sg__idmap_put(sg__idmap *m, const char *id, void *value) {
  if (!m->buckets) return SG_ENOMEM;
  uint64_t h = hash_of(m, id);
  sg__idmap_entry **pp = slot_of(m, id, h);
  if (*pp) {
    (*pp)->id = id;
    (*pp)->value = value;
    return 0;
  }
  sg__idmap_entry *e = malloc(sizeof *e);
  if (!e) return SG_ENOMEM;
  *e = (sg__idmap_entry){NULL, h, id, value};
  *pp = e;
  if (++m->count > m->mask + 1) grow(m);
  return 0;
}

void sg__idmap_remove(sg__idmap *m, const char *id, const void *value) {
  if (!m->buckets || !id) return;
  sg__idmap_entry **pp = slot_of(m, id, hash_of(m, id));
  sg__idmap_entry *e = *pp;
  if (!e || (value && e->value != value)) return;
  *pp = e->next;
  free(e);
  m->count--;
}

size_t sg__idmap_count(const sg__idmap *m) { return m->count; }
