/* The SQLite store's WAL checkpoints, off the loop thread.
 *
 * SQLite's automatic checkpoint runs inside the commit that makes the WAL
 * pass 1000 pages, on the thread that commits (the loop's): it copies the
 * WAL's pages back into the database file and fsyncs both. This replaces it
 * on one connection (sqlite3_wal_hook replaces the automatic checkpoint):
 * after each commit the hook learns the WAL's size; past `pages` a thread
 * of its own runs a PASSIVE checkpoint on a second connection (at most one
 * at a time); past `limit` the committing thread waits for that thread and
 * runs a RESTART checkpoint itself, so the WAL stays bounded even when the
 * thread cannot keep up. Errors of the thread are logged with the database's
 * path (by the committing thread, at its next commit or at the stop).
 * Why a thread of its own and not libuv's pool: the store has no loop (it is
 * opened and closed synchronously, also without one), a stop must wait for
 * a checkpoint under way and free everything at once, and a checkpoint's
 * fsyncs would hold a pool thread the Push path's signature checks use.
 * The thread starts at the first checkpoint, so an idle store has none. */
#ifndef SEGUE_STORE_WAL_H
#define SEGUE_STORE_WAL_H
#include <sqlite3.h>

#include "log.h"

/* How many new pages start the thread's checkpoint (about 1 MB of 4 KiB
 * pages), and the bound past which the committing thread checkpoints itself
 * (about 16 MB). Under steady writes the WAL never catches up by itself
 * (commits add pages while the thread copies), so the bound's RESTART on the
 * committing thread comes every `limit` pages; it has to fsync what the WAL
 * got since the thread's last checkpoint began. At 1000 pages (SQLite's own
 * automatic size) that was up to 4 MB, 12-18 ms on this project's VM and
 * the p99 latency of routing at 1k msg/s (9 ms); at 250 it is a few ms
 * (docs/performance.md). */
#define SG_WAL_CHECKPOINT_PAGES 250
#define SG_WAL_LIMIT_PAGES 4000

/* The store's connections wait this long for a lock another connection
 * holds; the bound's RESTART, on the committing (loop) thread, waits only
 * SG_WAL_RESTART_WAIT_MS for readers and writers, so a reader that keeps
 * its snapshot (a CLI, a backup) stalls the loop that long, not seconds. */
#define SG_STORE_BUSY_TIMEOUT_MS 5000
#define SG_WAL_RESTART_WAIT_MS 100

typedef struct sg__wal sg__wal;

/* Takes over the checkpoints of `db` (a WAL-mode connection used by one
 * thread), a database at `path` (the name SQLite resolved is kept, for the
 * thread's connection and the log). pages/limit: 0 for the defaults
 * above. `log` (may be NULL: stderr) must outlive the checkpointer. Returns 0
 * or SG_ENOMEM; on failure `db` keeps SQLite's automatic checkpoint. */
int sg__wal_start(sqlite3 *db, const char *path, const sg__logger *log, unsigned pages,
                  unsigned limit, sg__wal **out);
/* Waits for a checkpoint under way, stops the thread, closes its
 * connection and frees `w` (NULL is fine). Call it before closing `db`. */
void sg__wal_stop(sg__wal *w);
/* Tests: while held, the thread starts no checkpoint (as when it cannot
 * keep up), so the bound is the committing thread's to keep. */
void sg__wal_hold(sg__wal *w, int hold);
/* Checkpoints the thread has finished (tests; read on the committing thread). */
unsigned sg__wal_done(sg__wal *w);

#endif
