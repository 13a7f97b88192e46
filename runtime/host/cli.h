/* What the command line (runtime/cli) may ask of the host beyond segue.h.
 * No Lua here: the commands themselves are Lua (scripts/segue/cli.lua). */
#ifndef SEGUE_HOST_CLI_H
#define SEGUE_HOST_CLI_H
#include "log.h"
#include "segue.h"

/* Calls segue.boot.<fn>(argv...) (strings), which returns true or nil, err
 * [, code]: 0, or SG_ECONFIG (the message in sg_host_last_error). */
int sg__host_call_boot(sg_host *h, const char *fn, const char *const *argv, int argc);

/* Runs the command `argv[0]` of segue.cli with the rest as its arguments,
 * protected; returns its exit code, -1 when there is no such command, 1
 * when it raised (the error is logged). */
int sg__host_cli(sg_host *h, const char *const *argv, int argc);

/* segue.boot.exit_code: what a standalone backend's end asks the process
 * to exit with (0 when stdin ended, 1 when the script failed). */
int sg__host_exit_code(sg_host *h);

/* Makes the signals `signums` interrupt Lua code that is running when they
 * arrive (an uncatchable error at its next instruction), then runs the
 * handler installed before (libuv's, so the loop still sees the signal).
 * Call after uv_signal_start for them, on the thread that runs the loop
 * (a signal another thread takes is sent on to it). One host per process. */
void sg__host_catch_interrupts(sg_host *h, const int *signums, int n);

/* The host's logger (for the CLI's own lines). */
const sg__logger *sg__host_logger(const sg_host *h);

#endif
