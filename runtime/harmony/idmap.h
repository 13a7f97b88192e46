/* A map from an id (a NUL-terminated string) to a pointer, O(1) whatever
 * the number of entries: chained buckets hashed with SipHash (libsodium's
 * crypto_shorthash) under a random key, so that ids a peer chooses (server
 * ids come from tokens) cannot pile into one bucket. The table doubles when
 * the entries outnumber the buckets. The postbox finds its peers with it,
 * the federation its peers entries and key fetches.
 *
 * The ids are borrowed: each must stay valid and unchanged while its entry
 * is in the map (the owner's own copy, removed before it is freed). Not
 * thread-safe (the loop's thread only). */
#ifndef SEGUE_IDMAP_H
#define SEGUE_IDMAP_H
#include <stddef.h>
#include <stdint.h>

typedef struct sg__idmap_entry {
  struct sg__idmap_entry *next;
  uint64_t hash;
  const char *id;
  void *value;
} sg__idmap_entry;

typedef struct sg__idmap {
  sg__idmap_entry **buckets;
  size_t mask;   /* buckets - 1 (a power of two minus one) */
  size_t count;
  unsigned char key[16];
} sg__idmap;

/* 0 or SG_ENOMEM. */
int sg__idmap_init(sg__idmap *m);
/* Frees the table and its entries (not the ids or values); safe on a zeroed
 * map and twice. */
void sg__idmap_free(sg__idmap *m);
/* The value of `id`, or NULL. */
void *sg__idmap_get(const sg__idmap *m, const char *id);
/* Maps `id` (borrowed) to `value`, replacing what it mapped to. 0 or
 * SG_ENOMEM (then the map is unchanged). */
int sg__idmap_put(sg__idmap *m, const char *id, void *value);
/* Removes `id` if it maps to `value` (any value when `value` is NULL). */
void sg__idmap_remove(sg__idmap *m, const char *id, const void *value);
size_t sg__idmap_count(const sg__idmap *m);
/* SipHash of `id` under a 16-byte key: the hash of the map, and of the
 * peer key cache (keycache.c), which keeps its own chains for its LRU. */
uint64_t sg__id_hash(const unsigned char key[16], const char *id);

#endif
