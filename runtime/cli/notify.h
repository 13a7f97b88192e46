/* The systemd service notification protocol (sd_notify(3)) without
 * libsystemd: one datagram per state change to the AF_UNIX socket named by
 * $NOTIFY_SOCKET (a path, or "@name" for the abstract namespace), and
 * WATCHDOG=1 keep-alives every half of $WATCHDOG_USEC when the watchdog is
 * ours ($WATCHDOG_PID unset or our pid). Without $NOTIFY_SOCKET everything
 * here does nothing: segue runs the same outside systemd.
 *
 * The protocol is a few lines of documented datagrams; libsystemd would be
 * a dependency of the whole program for them. */
#ifndef SEGUE_CLI_NOTIFY_H
#define SEGUE_CLI_NOTIFY_H

#include <uv.h>

typedef struct {
  uv_timer_t watchdog;
  int watchdog_on;  /* the timer runs: closed by sg__notify_close */
} sg__notifier;

/* Takes $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID out of the
 * environment (kept here), so backends started later do not inherit them
 * and talk to systemd in segue's name. Call once, before anything else. */
void sg__notify_init(void);

/* Sends `state` ("READY=1", "STOPPING=1", ...) if $NOTIFY_SOCKET was set.
 * Returns 0 (also when unset), or a negative errno; never raises. */
int sg__notify(const char *state);

/* Starts the watchdog timer on `loop` if systemd asked for one. The timer
 * does not keep the loop alive. */
void sg__notify_watchdog_start(sg__notifier *n, uv_loop_t *loop);

/* Stops and closes the watchdog timer (asynchronously, as libuv does). */
void sg__notify_close(sg__notifier *n);

#endif
