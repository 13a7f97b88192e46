/* The segue command line: global options, the commands that own the loop's
 * life (run, backend, exec), and every other command handed to segue.cli
 * (scripts/segue/cli.lua). No Lua here: the host runs it. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "log.h"
#include "notify.h"
#include "segue.h"

static const char usage[] =
    "usage: segue [-v|-q] COMMAND [ARGS]\n"
    "\n"
    "  run [CONFIG]              run the host (without CONFIG: the embedded default)\n"
    "  check CONFIG              validate CONFIG and the scripts it names; start nothing\n"
    "  backend FILE.lua [K=V...] run one Lua backend on stdin/stdout (the backend protocol)\n"
    "  exec FILE.lua [ARGS...]   run a Lua script with the segue API, then stop\n"
    "  reload [CONFIG]           make the segue running with CONFIG's data_dir reload\n"
    "  key [CONFIG]              print the server id and federation public key (creates the key)\n"
    "  status [CONFIG]           print backends' states, counters and peers' queues of the segue using CONFIG (JSON)\n"
    "  watch [CONFIG]            print each message and copy of the running segue as it passes\n"
    "  rules test RULES.lua [--since DURATION] [--room backend:room] [CONFIG]\n"
    "                            replay the message log through RULES.lua, sending nothing\n"
    "  user add NAME [--admin] [CONFIG]   add a user of the client API; prints its token once\n"
    "  user list [CONFIG] | user remove NAME [CONFIG]\n"
    "  config --default          print the embedded default config\n"
    "  --version, --help\n"
    "\n"
    "  -v  more log (debug)   -q  less log (warnings and errors)\n"
    "Signals: SIGINT/SIGTERM stop gracefully, SIGHUP reloads the config.\n";

typedef struct {
  uv_loop_t *loop;
  sg_host *host;
  uv_signal_t sigint, sigterm, sighup;
  int stopping, exit_code;
  int serving;               /* `run`: tells systemd (notify.h) how it goes */
  sg__notifier notifier;
} app;

static void host_closed(void *data) {
  app *a = data;
  a->host = NULL;
  sg__notify_close(&a->notifier);
  uv_close((uv_handle_t *)&a->sigint, NULL);
  uv_close((uv_handle_t *)&a->sigterm, NULL);
  uv_close((uv_handle_t *)&a->sighup, NULL);
}

static void host_stopped(sg_host *h) {
  app *a = sg_host_get_data(h);
  sg_host_close(h, host_closed, a);
}

static void on_signal(uv_signal_t *s, int signum) {
  app *a = s->data;
  if (signum == SIGHUP) {
    if (!a->host) return;
    char state[96];
    snprintf(state, sizeof state, "RELOADING=1\nMONOTONIC_USEC=%llu", (unsigned long long)(uv_hrtime() / 1000));
    if (a->serving) sg__notify(state);
    int rc = sg_host_reload(a->host);
    if (a->serving) sg__notify(rc == 0 ? "READY=1\nSTATUS=running" : "READY=1\nSTATUS=reload failed, the previous config runs");
    return;
  }
  if (a->serving && !a->stopping) sg__notify("STOPPING=1");
  if (a->stopping++) {
    fprintf(stderr, "segue: second signal, exiting now\n");
    exit(1);
  }
  sg__log(a->host ? sg__host_logger(a->host) : NULL, SG_LOG_INFO, NULL, NULL, "stopping (signal %d)", signum);
  if (a->host) sg_host_stop(a->host, host_stopped);
}

static void watch_signals(app *a) {
  uv_signal_t *sigs[] = {&a->sigint, &a->sigterm, &a->sighup};
  int nums[] = {SIGINT, SIGTERM, SIGHUP};
  for (int i = 0; i < 3; i++) {
    uv_signal_init(a->loop, sigs[i]);
    sigs[i]->data = a;
    uv_signal_start(sigs[i], on_signal, nums[i]);
    uv_unref((uv_handle_t *)sigs[i]);  /* signals alone do not keep us running */
  }
}

/* Runs the loop until every handle is gone, then closes it. */
static int finish(app *a, int code) {
  if (a->host) sg_host_close(a->host, host_closed, a);
  uv_run(a->loop, UV_RUN_DEFAULT);
  uv_loop_close(a->loop);
  return code;
}

static int fail(app *a, const char *what) {
  const char *err = a->host ? sg_host_last_error(a->host) : NULL;
  if (err && err[0]) fprintf(stderr, "segue: %s: %s\n", what, err);
  return finish(a, 1);
}

static int cmd_run(app *a, int argc, char **argv) {
  int rc = argc > 0 ? sg_host_load_config_file(a->host, argv[0])
                    : sg__host_call_boot(a->host, "load_default_config", NULL, 0);
  if (rc == 0) rc = sg_host_start(a->host);
  if (rc != 0) return fail(a, argc > 0 ? argv[0] : "default config");
  a->serving = 1;
  sg__notify("READY=1\nSTATUS=running");
  sg__notify_watchdog_start(&a->notifier, a->loop);
  /* Keep running until a signal asks us to stop. */
  uv_ref((uv_handle_t *)&a->sigint);
  uv_run(a->loop, UV_RUN_DEFAULT);
  uv_loop_close(a->loop);
  return a->exit_code;
}

static int cmd_backend(app *a, int argc, char **argv) {
  if (argc < 1) {
    fputs(usage, stderr);
    return finish(a, 2);
  }
  if (sg__host_call_boot(a->host, "standalone", (const char *const *)argv, argc) != 0)
    return fail(a, argv[0]);
  uv_run(a->loop, UV_RUN_DEFAULT);
  return finish(a, sg__host_exit_code(a->host));
}

static int cmd_exec(app *a, int argc, char **argv) {
  if (argc < 1) {
    fputs(usage, stderr);
    return finish(a, 2);
  }
  int rc = sg__host_call_boot(a->host, "exec", (const char *const *)argv, argc);
  if (rc != 0) fprintf(stderr, "%s\n", sg_host_last_error(a->host));
  /* The script drove the loop itself (segue.await); what it started ends
   * with it: backends stop gracefully, then the host closes. */
  sg_host_stop(a->host, host_stopped);
  uv_run(a->loop, UV_RUN_DEFAULT);
  uv_loop_close(a->loop);
  return rc == 0 ? 0 : 1;
}

int main(int argc, char **argv) {
  int level = -1, i = 1;
  for (; i < argc && argv[i][0] == '-'; i++) {
    if (strcmp(argv[i], "-v") == 0) level = SG_LOG_DEBUG;
    else if (strcmp(argv[i], "-q") == 0) level = SG_LOG_WARN;
    else if (strcmp(argv[i], "--version") == 0) {
      printf("segue %s\n", sg_version_string());
      return 0;
    } else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
      fputs(usage, stdout);
      return 0;
    } else {
      fprintf(stderr, "segue: unknown option %s\n\n%s", argv[i], usage);
      return 2;
    }
  }
  if (i >= argc) {
    fputs(usage, stderr);
    return 2;
  }
  const char *cmd = argv[i++];
  int (*fn)(app *, int, char **) = NULL;
  if (strcmp(cmd, "run") == 0) {
    fn = cmd_run;
    sg__notify_init();  /* before any backend starts: they must not inherit it */
  }
  else if (strcmp(cmd, "backend") == 0) fn = cmd_backend;
  else if (strcmp(cmd, "exec") == 0) fn = cmd_exec;

  /* A backend that dies must not kill us with SIGPIPE: writes just fail. */
  signal(SIGPIPE, SIG_IGN);
  /* Past a file size limit a write should fail (and the store say so),
   * not kill us. */
  signal(SIGXFSZ, SIG_IGN);
  app a = {0};
  a.loop = uv_default_loop();
  /* The standalone backend's stdout is the protocol: logs stay on stderr,
   * which is where they always go. */
  sg_host_options opts = {sizeof opts, NULL, level, NULL, NULL, NULL, NULL};
  int rc = sg_host_new(a.loop, &opts, &a.host);
  if (rc != 0) {
    fprintf(stderr, "segue: cannot create the host: %s\n", sg_strerror(rc));
    return 1;
  }
  sg_host_set_data(a.host, &a);
  watch_signals(&a);
  /* A config or rule stuck in Lua must not make us deaf to them. */
  sg__host_catch_interrupts(a.host, (const int[]){SIGINT, SIGTERM}, 2);
  if (!fn) { /* segue.cli's: check, reload, status, key, config, ... */
    rc = sg__host_cli(a.host, (const char *const *)&argv[i - 1], argc - i + 1);
    if (rc == -1) {
      fprintf(stderr, "segue: unknown command %s\n\n%s", cmd, usage);
      rc = 2;
    }
    return finish(&a, rc);
  }
  return fn(&a, argc - i, argv + i);
}
