/* What the store wrote, read through a connection of the test's own (the
 * store keeps its connection to itself): for the C unit tests. */
#ifndef SEGUE_TEST_SQL_PEEK_H
#define SEGUE_TEST_SQL_PEEK_H
#include <sqlite3.h>
#include <stdio.h>
#include <string.h>

/* The first column of the first row of sql on the database at db, as an
 * integer; -1 when there is none. */
static inline long long sql_int(const char *db, const char *sql) {
  sqlite3 *c;
  sqlite3_stmt *st;
  long long v = -1;
  if (sqlite3_open(db, &c) == SQLITE_OK && sqlite3_prepare_v2(c, sql, -1, &st, NULL) == SQLITE_OK) {
    if (sqlite3_step(st) == SQLITE_ROW) v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
  }
  sqlite3_close(c);
  return v;
}

/* The first column of every row, each followed by ';' (in a buffer that
 * the next call reuses). */
static inline const char *sql_rows(const char *db, const char *sql) {
  static char out[4096];
  sqlite3 *c;
  sqlite3_stmt *st;
  out[0] = '\0';
  if (sqlite3_open(db, &c) == SQLITE_OK && sqlite3_prepare_v2(c, sql, -1, &st, NULL) == SQLITE_OK) {
    while (sqlite3_step(st) == SQLITE_ROW) {
      size_t n = strlen(out);
      const unsigned char *t = sqlite3_column_text(st, 0);
      snprintf(out + n, sizeof out - n, "%s;", t ? (const char *)t : "");
    }
    sqlite3_finalize(st);
  }
  sqlite3_close(c);
  return out;
}
#endif
