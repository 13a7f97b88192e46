#include "notify.h"

#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static char socket_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
static unsigned long long watchdog_usec;

void sg__notify_init(void) {
  const char *path = getenv("NOTIFY_SOCKET");
  const char *usec = getenv("WATCHDOG_USEC");
  const char *pid = getenv("WATCHDOG_PID");
  if (path && strlen(path) < sizeof socket_path) snprintf(socket_path, sizeof socket_path, "%s", path);
  if (usec && (!pid || !pid[0] || strtol(pid, NULL, 10) == (long)getpid())) {  /* else another process's */
    char *end;
    unsigned long long us = strtoull(usec, &end, 10);
    if (*end == '\0') watchdog_usec = us;
  }
  unsetenv("NOTIFY_SOCKET");
  unsetenv("WATCHDOG_USEC");
  unsetenv("WATCHDOG_PID");
}

int sg__notify(const char *state) {
  const char *path = socket_path;
  if (!path[0]) return 0;
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  size_t len = strlen(path);
  if ((path[0] != '/' && path[0] != '@') || len >= sizeof sa.sun_path) return -EINVAL;
  memcpy(sa.sun_path, path, len);
  if (path[0] == '@') sa.sun_path[0] = '\0';  /* abstract namespace */
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  socklen_t salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len);
  ssize_t n = sendto(fd, state, strlen(state), MSG_NOSIGNAL, (struct sockaddr *)&sa, salen);
  int rc = n < 0 ? -errno : 0;
  close(fd);
  return rc;
}

static void on_watchdog(uv_timer_t *t) {
  (void)t;
  sg__notify("WATCHDOG=1");
}

void sg__notify_watchdog_start(sg__notifier *n, uv_loop_t *loop) {
  if (!socket_path[0] || watchdog_usec == 0) return;
  uint64_t ms = watchdog_usec / 2000;  /* every half of the interval, as sd_watchdog_enabled(3) advises */
  if (ms == 0) ms = 1;
  uv_timer_init(loop, &n->watchdog);
  uv_unref((uv_handle_t *)&n->watchdog);
  uv_timer_start(&n->watchdog, on_watchdog, ms, ms);
  n->watchdog_on = 1;
  sg__notify("WATCHDOG=1");
}

void sg__notify_close(sg__notifier *n) {
  if (!n->watchdog_on) return;
  n->watchdog_on = 0;
  uv_timer_stop(&n->watchdog);
  uv_close((uv_handle_t *)&n->watchdog, NULL);
}
