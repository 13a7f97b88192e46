/* The federation's peer key cache: server id -> Ed25519 public key, bounded
 * and O(1). A hash table (SipHash with a random key, so that chosen ids
 * cannot pile into one bucket) whose entries are on one of two LRU lists:
 *
 *   positive  a key that verified a signature (or a store loaded); at most
 *             max_positive, the least recently used goes first
 *   negative  a server whose key could not be fetched (no key), or whose
 *             fetched key has verified no signature yet (has_key), until
 *             `stamp`; at most max_negative. Such a key only checks the
 *             next tokens without fetching again; one that verifies makes
 *             it positive.
 *
 * The cache stores only what its caller puts in it: the federation puts a
 * key after a signature verified with it, never on the say-so of a token.
 * Not thread-safe (the loop's thread only).
 */
#ifndef SEGUE_KEYCACHE_H
#define SEGUE_KEYCACHE_H
#include <stddef.h>
#include <stdint.h>

#include "harmony_keys.h"

#define SG_KEYCACHE_DEFAULT_POSITIVE 4096
#define SG_KEYCACHE_DEFAULT_NEGATIVE 1024

typedef struct sg__keycache_entry {
  struct sg__keycache_entry *hnext;       /* bucket chain */
  struct sg__keycache_entry *prev, *next; /* its LRU list, most recent first */
  uint64_t hash;
  int negative;
  int has_key;                            /* negative: pk holds an unverified key */
  unsigned char pk[SG_KEYS_PUBLIC_BYTES]; /* positive only */
  uint64_t stamp;  /* positive: when the key was fetched (0: never); negative: until */
  char id[];
} sg__keycache_entry;

typedef struct sg__keycache {
  sg__keycache_entry **buckets;
  size_t mask;                            /* buckets - 1, a power of two minus one */
  sg__keycache_entry *lru[2];             /* [0] positive, [1] negative: heads */
  sg__keycache_entry *tail[2];
  size_t count[2], max[2];
  unsigned char hkey[16];
} sg__keycache;

/* 0 or SG_ENOMEM; 0 for a maximum means its default. */
int sg__keycache_init(sg__keycache *c, size_t max_positive, size_t max_negative);
/* Frees every entry and the table; safe on a zeroed cache. */
void sg__keycache_free(sg__keycache *c);

/* The entry for `id` (made most recently used), or NULL. Borrowed until the
 * next put or remove. */
sg__keycache_entry *sg__keycache_find(sg__keycache *c, const char *id);

/* A positive entry for `id` (replacing a negative one), fetched at
 * `fetched_at`. The least recently used positive entry goes when full.
 * 0 or SG_ENOMEM. */
int sg__keycache_put(sg__keycache *c, const char *id, const unsigned char pk[SG_KEYS_PUBLIC_BYTES],
                     uint64_t fetched_at);

/* A negative entry for `id` until `until`, holding `pk` (may be NULL),
 * unless it has a positive one (a key that once verified is kept;
 * refetches are limited by its stamp). 0 or SG_ENOMEM. */
int sg__keycache_put_negative(sg__keycache *c, const char *id, uint64_t until,
                              const unsigned char *pk);

void sg__keycache_remove(sg__keycache *c, const char *id);

/* Entries on each list now. */
size_t sg__keycache_count(const sg__keycache *c, int negative);

#endif
