/* The peer key cache: a chained hash table with two LRU lists. */
#include "keycache.h"

#include <stdlib.h>
#include <string.h>

#include <sodium.h>

#include "idmap.h"
#include "segue.h"

typedef sg__keycache_entry entry;

int sg__keycache_init(sg__keycache *c, size_t max_positive, size_t max_negative) {
  memset(c, 0, sizeof *c);
  c->max[0] = max_positive ? max_positive : SG_KEYCACHE_DEFAULT_POSITIVE;
  c->max[1] = max_negative ? max_negative : SG_KEYCACHE_DEFAULT_NEGATIVE;
  /* Never resized: twice the most entries there can be keeps chains short. */
  size_t n = 16;
  while (n < 2 * (c->max[0] + c->max[1])) n *= 2;
  if (sodium_init() < 0 || !(c->buckets = calloc(n, sizeof *c->buckets))) return SG_ENOMEM;
  c->mask = n - 1;
  randombytes_buf(c->hkey, sizeof c->hkey);
  return 0;
}

static uint64_t hash_of(const sg__keycache *c, const char *id) { return sg__id_hash(c->hkey, id); }

static void lru_unlink(sg__keycache *c, entry *e) {
  int k = e->negative;
  if (e->prev) e->prev->next = e->next;
  else c->lru[k] = e->next;
  if (e->next) e->next->prev = e->prev;
  else c->tail[k] = e->prev;
  e->prev = e->next = NULL;
  c->count[k]--;
}

static void lru_push(sg__keycache *c, entry *e) {
  int k = e->negative;
  e->prev = NULL;
  e->next = c->lru[k];
  if (e->next) e->next->prev = e;
  else c->tail[k] = e;
  c->lru[k] = e;
  c->count[k]++;
}

static entry **slot_of(sg__keycache *c, const char *id, uint64_t h) {
  entry **pp = &c->buckets[h & c->mask];
  while (*pp && ((*pp)->hash != h || strcmp((*pp)->id, id) != 0)) pp = &(*pp)->hnext;
  return pp;
}

static void drop(sg__keycache *c, entry *e) {
  entry **pp = slot_of(c, e->id, e->hash);
  *pp = e->hnext;
  lru_unlink(c, e);
  free(e);
}

sg__keycache_entry *sg__keycache_find(sg__keycache *c, const char *id) {
  if (!c->buckets) return NULL;
  entry *e = *slot_of(c, id, hash_of(c, id));
  if (e) {
    lru_unlink(c, e);
    lru_push(c, e);
  }
  return e;
}

/* The entry for `id` on list `negative`, made when missing (evicting that
 * list's least recently used entry when it is full). */
static entry *get(sg__keycache *c, const char *id, int negative) {
  uint64_t h = hash_of(c, id);
  entry **pp = slot_of(c, id, h);
  entry *e = *pp;
  if (e) {
    lru_unlink(c, e);
    e->negative = negative;
    lru_push(c, e);
    /* moved from the other list: this one may now be one over */
    if (c->count[negative] > c->max[negative]) drop(c, c->tail[negative]);
    return e;
  }
  if (c->count[negative] >= c->max[negative]) {
    drop(c, c->tail[negative]);
    pp = slot_of(c, id, h);  /* the chain may have changed */
  }
  size_t len = strlen(id);
  if (!(e = calloc(1, sizeof *e + len + 1))) return NULL;
  memcpy(e->id, id, len + 1);
  e->hash = h;
  e->negative = negative;
  *pp = e;
  lru_push(c, e);
  return e;
}

int sg__keycache_put(sg__keycache *c, const char *id, const unsigned char pk[SG_KEYS_PUBLIC_BYTES],
                     uint64_t fetched_at) {
  if (!c->buckets) return SG_ENOMEM;
  entry *e = get(c, id, 0);
  if (!e) return SG_ENOMEM;
  memcpy(e->pk, pk, SG_KEYS_PUBLIC_BYTES);
  e->has_key = 1;
  e->stamp = fetched_at;
  return 0;
}

int sg__keycache_put_negative(sg__keycache *c, const char *id, uint64_t until,
                              const unsigned char *pk) {
  if (!c->buckets) return SG_ENOMEM;
  entry *e = *slot_of(c, id, hash_of(c, id));
  if (e && !e->negative) return 0;
  if (!(e = get(c, id, 1))) return SG_ENOMEM;
  e->stamp = until;
  e->has_key = pk != NULL;
  if (pk) memcpy(e->pk, pk, SG_KEYS_PUBLIC_BYTES);
  return 0;
}

void sg__keycache_remove(sg__keycache *c, const char *id) {
  if (!c->buckets) return;
  entry *e = *slot_of(c, id, hash_of(c, id));
  if (e) drop(c, e);
}

size_t sg__keycache_count(const sg__keycache *c, int negative) {
  return c->count[negative ? 1 : 0];
}

void sg__keycache_free(sg__keycache *c) {
  for (int k = 0; k < 2; k++)
    while (c->lru[k]) {
      entry *e = c->lru[k];
      c->lru[k] = e->next;
      free(e);
    }
  free(c->buckets);
  memset(c, 0, sizeof *c);
}
