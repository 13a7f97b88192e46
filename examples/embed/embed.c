/* embed: a C program that runs segue inside itself, on its own libuv loop.
 *
 * It registers a backend written in C ("echo": a chat service of one user,
 * alice), loads a config given as text (the built-in memory backend as
 * "notes", and the rules file named on the command line), and starts the
 * host. Its own timer then makes alice say something in echo; the rules
 * relay it into notes and post a link to the copy into echo's #status room;
 * echo asks notes for that message from C (sg_host_request) and checks it is
 * alice's. Then it closes the host and its own timers, and proves segue left
 * nothing on the loop: uv_loop_close() returns 0.
 *
 *   embed RULES.lua      exit 0: the message went through and all was closed
 */
#define _XOPEN_SOURCE 700  /* nftw, realpath */
#include <ftw.h>
#include <limits.h>
#include <segue.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct app {
  uv_loop_t loop;
  uv_timer_t hello;     /* ours: alice speaks once the host runs */
  uv_timer_t watchdog;  /* ours: gives up if nothing arrives */
  sg_host *host;
  sg_cbackend *echo;
  char data_dir[64];
  int arrived;          /* the relayed message was found in notes */
  int lua_errors;
} app;

/* ---- closing: segue first, then our own handles ---------------------------- */

static void host_closed(void *data) {
  app *a = data;
  a->host = NULL;  /* freed before this callback runs */
  a->echo = NULL;
  uv_close((uv_handle_t *)&a->hello, NULL);
  uv_close((uv_handle_t *)&a->watchdog, NULL);
}

static void finish(app *a) {
  if (a->host) sg_host_close(a->host, host_closed, a);
}

/* ---- the C backend "echo" -------------------------------------------------- */

static int echo_start(sg_cbackend *b) {
  fprintf(stderr, "embed: backend %s started\n", sg_cbackend_name(b));
  return 0;
}

/* The MessageID a MessageLink in `body` points to, copied into `id`. */
static int find_link(const char *body, char *id, size_t cap) {
  static const char tag[] = "{\"type\":\"MessageLink\",\"value\":\"";
  const char *p = strstr(body, tag);
  if (!p) return 0;
  p += sizeof tag - 1;
  size_t n = strcspn(p, "\"");
  if (n == 0 || n >= cap) return 0;
  memcpy(id, p, n);
  id[n] = '\0';
  return 1;
}

/* notes' answer to our MessageGet: the relayed copy of alice's message. */
static void got_message(void *data, int err, const char *body, const char *message) {
  app *a = data;
  if (err != 0) {
    fprintf(stderr, "embed: MessageGet failed: %s: %s\n", sg_err_name(err), message);
  } else if (strstr(body, "\"hello from C\"") && strstr(body, "\"bridged_from\"")) {
    fprintf(stderr, "embed: notes has it: %s\n", body);
    a->arrived = 1;
  } else {
    fprintf(stderr, "embed: notes has something else: %s\n", body);
  }
  finish(a);
}

/* A request from the rules; only a notice into #status is expected. */
static void echo_request(sg_cbackend *b, uint32_t seq, const char *body) {
  app *a = sg_cbackend_data(b);
  char id[128], get[192];
  if (strncmp(body, "{\"type\":\"MessageSend\"", 21) != 0 || !find_link(body, id, sizeof id)) {
    sg_cbackend_respond(b, seq, "{\"type\":\"Error\",\"value\":{\"message\":\"echo takes notices only\"}}");
    return;
  }
  sg_cbackend_respond(b, seq, "{\"type\":\"MessageID\",\"value\":\"e2\"}");
  fprintf(stderr, "embed: the rules say alice's message is %s in notes; asking notes\n", id);
  snprintf(get, sizeof get, "{\"type\":\"MessageGet\",\"value\":\"%s\"}", id);
  int rc = sg_host_request(a->host, "notes", get, got_message, a);
  if (rc != 0) {
    fprintf(stderr, "embed: cannot ask notes: %s\n", sg_strerror(rc));
    finish(a);
  }
}

static const sg_backend_vtable echo_vt = {
    .size = sizeof(sg_backend_vtable),
    .start = echo_start,
    .request = echo_request,
    .stop = NULL,
    .closed = NULL,
};

/* ---- our own timers ---------------------------------------------------------- */

static void say_hello(uv_timer_t *t) {
  app *a = t->data;
  long long now = (long long)time(NULL) * 1000;
  char update[512];
  snprintf(update, sizeof update,
           "{\"type\":\"MessageUpsert\",\"value\":{\"id\":\"e1\",\"sender\":\"alice\","
           "\"recipient\":\"#lobby\",\"attachments\":[],"
           "\"content\":{\"type\":\"Text\",\"value\":\"hello from C\"},"
           "\"create_time\":%lld,\"edit_time\":%lld}}",
           now, now);
  int rc = sg_cbackend_update(a->echo, update);
  if (rc != 0) {
    fprintf(stderr, "embed: update refused: %s\n", sg_strerror(rc));
    finish(a);
  }
}

static void give_up(uv_timer_t *t) {
  fprintf(stderr, "embed: the message did not arrive in time\n");
  finish(t->data);
}

/* ---- the data directory: a fresh one per run, removed at the end ---------------- */

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
  (void)st;
  (void)flag;
  (void)ftw;
  return remove(path);
}

static void remove_tree(const char *dir) { nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS); }

/* ---- the host ------------------------------------------------------------------ */

static void on_lua_error(void *data, int err, const char *message) {
  app *a = data;
  a->lua_errors++;
  fprintf(stderr, "embed: uncaught %s: %s\n", sg_err_name(err), message);
}

/* The config, as values: the memory backend and our rules file. */
static int load_config(app *a, const char *rules) {
  char path[PATH_MAX], text[PATH_MAX + 256];
  if (!realpath(rules, path)) {
    perror(rules);
    return SG_EINVAL;
  }
  int n = snprintf(text, sizeof text,
                   "backends = { notes = { script = \"memory\" } }\n"
                   "scripts = { [==[%s]==] }\n",
                   path);
  return sg_host_load_config_string(a->host, "embed-config", text, (size_t)n);
}

static int start(app *a, const char *rules) {
  sg_host_options opts = {sizeof opts, a->data_dir, -1, NULL, NULL, on_lua_error, a};
  int rc = sg_host_new(&a->loop, &opts, &a->host);
  if (rc != 0) return rc;
  sg_host_set_data(a->host, a);
  rc = sg_host_add_cbackend(a->host, "echo", &echo_vt, a, &a->echo);
  if (rc == 0) rc = load_config(a, rules);
  if (rc == 0) rc = sg_host_start(a->host);
  return rc;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: embed RULES.lua\n");
    return 2;
  }
  app a = {0};
  snprintf(a.data_dir, sizeof a.data_dir, "/tmp/segue-embed-XXXXXX");
  if (!mkdtemp(a.data_dir)) {
    perror("mkdtemp");
    return 1;
  }
  uv_loop_init(&a.loop);
  uv_timer_init(&a.loop, &a.hello);
  uv_timer_init(&a.loop, &a.watchdog);
  a.hello.data = a.watchdog.data = &a;

  int rc = start(&a, argv[1]);
  if (rc == 0) {
    /* The start may take long (valgrind, a loaded machine): time the
     * timers from now, not from the loop's creation. */
    uv_update_time(&a.loop);
    uv_timer_start(&a.hello, say_hello, 50, 0);
    uv_timer_start(&a.watchdog, give_up, 10000, 0);
  } else {
    fprintf(stderr, "embed: cannot start: %s: %s\n", sg_err_name(rc), sg_strerror(rc));
    if (a.host) finish(&a);
    else host_closed(&a);  /* no host was made: close our timers ourselves */
  }
  uv_run(&a.loop, UV_RUN_DEFAULT);
  /* UV_EBUSY here would mean segue left a handle open on our loop. */
  int closed = uv_loop_close(&a.loop);
  remove_tree(a.data_dir);
  if (closed != 0) fprintf(stderr, "embed: uv_loop_close: %s\n", uv_strerror(closed));
  fprintf(stderr, "embed: %s\n", a.arrived && closed == 0 && a.lua_errors == 0 ? "ok" : "FAILED");
  return a.arrived && closed == 0 && a.lua_errors == 0 ? 0 : 1;
}
