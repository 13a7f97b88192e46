/* The federation's key cache (issue 12, item 4): bounded, LRU per list,
 * negative entries never displace a key that verified. */
#include <stdio.h>
#include <string.h>

#include "keycache.h"
#include "segue.h"
#include "tap.h"

static void test_put_find_replace(void) {
  sg__keycache c;
  unsigned char a[32], b[32];
  memset(a, 1, sizeof a);
  memset(b, 2, sizeof b);
  CHECK(sg__keycache_init(&c, 4, 2) == 0);
  CHECK(sg__keycache_find(&c, "a.example:1") == NULL);
  CHECK(sg__keycache_put(&c, "a.example:1", a, 5) == 0);
  sg__keycache_entry *e = sg__keycache_find(&c, "a.example:1");
  CHECK(e && !e->negative && memcmp(e->pk, a, 32) == 0 && e->stamp == 5);
  CHECK(sg__keycache_put(&c, "a.example:1", b, 6) == 0);
  e = sg__keycache_find(&c, "a.example:1");
  CHECK(e && memcmp(e->pk, b, 32) == 0 && sg__keycache_count(&c, 0) == 1);
  /* a failed fetch does not forget a key that verified */
  CHECK(sg__keycache_put_negative(&c, "a.example:1", 100, NULL) == 0);
  e = sg__keycache_find(&c, "a.example:1");
  CHECK(e && !e->negative);
  CHECK(sg__keycache_put_negative(&c, "b.example:1", 100, NULL) == 0);
  e = sg__keycache_find(&c, "b.example:1");
  CHECK(e && e->negative && !e->has_key && e->stamp == 100);
  CHECK(sg__keycache_put_negative(&c, "b.example:1", 200, b) == 0);
  e = sg__keycache_find(&c, "b.example:1");
  CHECK(e && e->negative && e->has_key && memcmp(e->pk, b, 32) == 0 && e->stamp == 200);
  /* a key that verifies replaces the negative entry */
  CHECK(sg__keycache_put(&c, "b.example:1", a, 7) == 0);
  CHECK(sg__keycache_count(&c, 1) == 0 && sg__keycache_count(&c, 0) == 2);
  sg__keycache_remove(&c, "b.example:1");
  CHECK(sg__keycache_find(&c, "b.example:1") == NULL);
  sg__keycache_free(&c);
  sg__keycache_free(&c);  /* safe to repeat */
}

/* 20,000 distinct ids through a cache of 64 + 16: the counts never pass
 * the bounds, and the most recently used entries are the ones kept. */
static void test_bounded_lru(void) {
  sg__keycache c;
  unsigned char pk[32] = {0};
  char id[64];
  CHECK(sg__keycache_init(&c, 64, 16) == 0);
  CHECK(sg__keycache_put(&c, "keep.example:1", pk, 1) == 0);
  int over = 0;
  for (int i = 0; i < 20000; i++) {
    snprintf(id, sizeof id, "bogus-%d.example:1", i);
    if (i % 2) sg__keycache_put_negative(&c, id, 1, pk);
    else sg__keycache_put(&c, id, pk, 1);
    if (i % 50 == 0) sg__keycache_find(&c, "keep.example:1");  /* used: stays */
    if (sg__keycache_count(&c, 0) > 64 || sg__keycache_count(&c, 1) > 16) over = 1;
  }
  CHECK(!over);
  CHECK(sg__keycache_count(&c, 0) == 64 && sg__keycache_count(&c, 1) == 16);
  CHECK(sg__keycache_find(&c, "keep.example:1") != NULL);
  CHECK(sg__keycache_find(&c, "bogus-19999.example:1") != NULL);
  CHECK(sg__keycache_find(&c, "bogus-19998.example:1") != NULL);
  CHECK(sg__keycache_find(&c, "bogus-1.example:1") == NULL);
  CHECK(sg__keycache_find(&c, "bogus-0.example:1") == NULL);
  sg__keycache_free(&c);
}

int main(void) {
  test_put_find_replace();
  test_bounded_lru();
  return tap_done();
}
