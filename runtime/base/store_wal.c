/* The store's WAL checkpoints on a thread of their own: see store_wal.h. */
#include "store_wal.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "segue.h"

struct sg__wal {
  /* The committing thread's own: */
  sqlite3 *db;
  const sg__logger *log;
  char *path;
  unsigned pages, limit;
  unsigned retry_at;  /* after a RESTART that could not finish: try again from here */
  int no_thread;      /* the thread could not start: checkpoints run here */
  /* Shared with the thread, under mu: */
  uv_mutex_t mu;
  uv_cond_t work;     /* the thread waits here: want or stop */
  uv_cond_t idle;     /* the committing thread waits here for `running` to end */
  uv_thread_t thread;
  int started, want, running, stop, held;
  int here;           /* the committing thread checkpoints: the thread starts none */
  unsigned done;
  unsigned copied;    /* frames the thread's last checkpoint had copied back */
  char why[512];      /* the thread's first unreported error ("" if none) */
};

/* The thread's checkpoint, on its own connection (opened at the first).
 * BUSY is not a failure: another checkpoint (the committing thread's
 * RESTART, another process's) holds the checkpoint lock. */
static void checkpoint_passive(const char *path, sqlite3 **db, int *copied, char *why,
                               size_t len) {
  if (!*db) {
    int rc = sqlite3_open_v2(path, db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
    /* A connection learns the file is in WAL mode at its first read; until
     * then a checkpoint does nothing. */
    if (rc == SQLITE_OK) {
      sqlite3_busy_timeout(*db, SG_STORE_BUSY_TIMEOUT_MS);
      rc = sqlite3_exec(*db, "PRAGMA user_version", NULL, NULL, NULL);
    }
    if (rc != SQLITE_OK) {
      snprintf(why, len, "background checkpoint: cannot open a connection: %s",
               *db ? sqlite3_errmsg(*db) : sqlite3_errstr(rc));
      sqlite3_close(*db);
      *db = NULL;
      return;
    }
  }
  int rc = sqlite3_wal_checkpoint_v2(*db, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, copied);
  if (rc != SQLITE_OK && rc != SQLITE_BUSY)
    snprintf(why, len, "background checkpoint: %s", sqlite3_errmsg(*db));
}

static void thread_main(void *arg) {
  sg__wal *w = arg;
  sqlite3 *db = NULL;
  uv_mutex_lock(&w->mu);
  for (;;) {
    while (!w->stop && (!w->want || w->held || w->here)) uv_cond_wait(&w->work, &w->mu);
    if (w->stop) break;
    w->want = 0;
    w->running = 1;
    uv_mutex_unlock(&w->mu);
    char why[sizeof w->why] = "";
    int copied = 0;
    checkpoint_passive(w->path, &db, &copied, why, sizeof why);
    uv_mutex_lock(&w->mu);
    w->running = 0;
    w->copied = copied > 0 ? (unsigned)copied : 0;
    w->done++;
    if (why[0] && !w->why[0]) memcpy(w->why, why, sizeof why);
    uv_cond_broadcast(&w->idle);
  }
  uv_mutex_unlock(&w->mu);
  sqlite3_close(db);
}

/* Logs the thread's error, if any, on the committing thread. */
static void report(sg__wal *w) {
  char why[sizeof w->why] = "";
  uv_mutex_lock(&w->mu);
  if (w->why[0]) memcpy(why, w->why, sizeof why);
  w->why[0] = '\0';
  uv_mutex_unlock(&w->mu);
  if (why[0]) sg__log(w->log, SG_LOG_WARN, "store", w->path, "%s", why);
}

/* Starts the thread (mu held) with every signal blocked: signals stay the
 * loop thread's, as before the thread existed. */
static int start_thread(sg__wal *w) {
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  int rc = uv_thread_create(&w->thread, thread_main, w);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (rc == 0) w->started = 1;
  return rc;
}

/* Past the bound: wait for the thread's checkpoint, then RESTART here (it
 * waits, up to SG_WAL_RESTART_WAIT_MS, for readers, so the next commit
 * writes the WAL from its start). A reader that stays longer keeps the WAL
 * growing whoever checkpoints; then try again a quarter of `limit` frames
 * later, not at every commit (each try waits). */
static void checkpoint_here(sg__wal *w, sqlite3 *db, unsigned frames) {
  uv_mutex_lock(&w->mu);
  w->here = 1;
  while (w->running) uv_cond_wait(&w->idle, &w->mu);
  uv_mutex_unlock(&w->mu);
  int nlog = 0, ncopied = 0;
  sqlite3_busy_timeout(db, SG_WAL_RESTART_WAIT_MS);
  int rc = sqlite3_wal_checkpoint_v2(db, NULL, SQLITE_CHECKPOINT_RESTART, &nlog, &ncopied);
  sqlite3_busy_timeout(db, SG_STORE_BUSY_TIMEOUT_MS);
  uv_mutex_lock(&w->mu);
  w->here = 0;
  uv_mutex_unlock(&w->mu);
  if (rc == SQLITE_OK) {
    w->retry_at = 0;
    return;
  }
  w->retry_at = frames + w->limit / 4;
  sg__log(w->log, SG_LOG_WARN, "store", w->path,
          "the WAL passed %u pages (%u copied back of %d): %s; trying again at %u",
          w->limit, ncopied > 0 ? (unsigned)ncopied : 0, nlog, sqlite3_errmsg(db), w->retry_at);
}

/* After each commit on `db`, with the WAL's size in frames. */
static int on_commit(void *ud, sqlite3 *db, const char *name, int frames) {
  sg__wal *w = ud;
  (void)name;
  if (frames < 0 || (unsigned)frames < w->pages) return SQLITE_OK;
  report(w);
  if ((unsigned)frames >= w->limit && (unsigned)frames >= w->retry_at) {
    checkpoint_here(w, db, (unsigned)frames);
    return SQLITE_OK;
  }
  if (w->no_thread) {
    sqlite3_wal_checkpoint_v2(db, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
    return SQLITE_OK;
  }
  /* Another checkpoint only once `pages` more frames wait to be copied: one
   * right after the last would copy what a commit or two added, for the
   * price of two fsyncs. A WAL smaller than what was copied has restarted. */
  uv_mutex_lock(&w->mu);
  if ((unsigned)frames < w->copied) w->copied = 0;
  int rc = 0;
  if (!w->running && (unsigned)frames - w->copied >= w->pages) {
    rc = w->started ? 0 : start_thread(w);
    if (rc == 0) {
      w->want = 1;
      uv_cond_signal(&w->work);
    }
  }
  uv_mutex_unlock(&w->mu);
  if (rc != 0) {
    /* No thread: checkpoint here from now on, as SQLite would have. */
    w->no_thread = 1;
    sg__log(w->log, SG_LOG_WARN, "store", w->path,
            "no checkpoint thread (%s): checkpoints run on the committing thread",
            uv_strerror(rc));
    sqlite3_wal_checkpoint_v2(db, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
  }
  return SQLITE_OK;
}

int sg__wal_start(sqlite3 *db, const char *path, const sg__logger *log, unsigned pages,
                  unsigned limit, sg__wal **out) {
  *out = NULL;
  sg__wal *w = calloc(1, sizeof *w);
  /* SQLite's full path: the thread opens it later, perhaps after a chdir. */
  const char *full = sqlite3_db_filename(db, "main");
  if (!w || !(w->path = strdup(full && *full ? full : path))) goto nomem;
  if (uv_mutex_init(&w->mu)) goto nomem;
  if (uv_cond_init(&w->work)) {
    uv_mutex_destroy(&w->mu);
    goto nomem;
  }
  if (uv_cond_init(&w->idle)) {
    uv_cond_destroy(&w->work);
    uv_mutex_destroy(&w->mu);
    goto nomem;
  }
  w->db = db;
  w->log = log;
  w->pages = pages ? pages : SG_WAL_CHECKPOINT_PAGES;
  w->limit = limit ? limit : SG_WAL_LIMIT_PAGES;
  if (w->limit < w->pages) w->limit = w->pages;
  sqlite3_wal_hook(db, on_commit, w);  /* replaces SQLite's automatic checkpoint */
  *out = w;
  return 0;
nomem:
  if (w) free(w->path);
  free(w);
  return SG_ENOMEM;
}

void sg__wal_stop(sg__wal *w) {
  if (!w) return;
  sqlite3_wal_hook(w->db, NULL, NULL);
  uv_mutex_lock(&w->mu);
  w->stop = 1;
  uv_cond_signal(&w->work);
  uv_mutex_unlock(&w->mu);
  if (w->started) uv_thread_join(&w->thread);
  report(w);
  uv_cond_destroy(&w->idle);
  uv_cond_destroy(&w->work);
  uv_mutex_destroy(&w->mu);
  free(w->path);
  free(w);
}

void sg__wal_hold(sg__wal *w, int hold) {
  uv_mutex_lock(&w->mu);
  w->held = hold;
  if (!hold) uv_cond_signal(&w->work);
  uv_mutex_unlock(&w->mu);
}

unsigned sg__wal_done(sg__wal *w) {
  uv_mutex_lock(&w->mu);
  unsigned n = w->done;
  uv_mutex_unlock(&w->mu);
  return n;
}
