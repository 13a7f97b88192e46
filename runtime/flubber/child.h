/* The child-process transport: a backend is a program whose stdin receives
 * Requests and whose stdout carries InitInfo, Responses and Updates (one JSON
 * value after another); its stderr lines go to the log tagged with the
 * backend's name. */
#ifndef SEGUE_CHILD_H
#define SEGUE_CHILD_H
#include "backend.h"

typedef struct sg__child_spec {
  const char *cmd;          /* program: a path, or a name looked up in PATH */
  const char *const *args;  /* argv[1..], NULL-terminated; may be NULL */
  const char *const *env;   /* "KEY=VALUE" added to (and overriding) ours; may be NULL */
  const char *cwd;          /* may be NULL */
} sg__child_spec;

extern const sg__transport sg__child_transport;

/* Makes `b` a child-process backend: call after sg__backend_init (which
 * clears `b`) with tp = &sg__child_transport, before starting it. The spec
 * is copied. */
int sg__child_attach(sg__backend *b, const sg__child_spec *spec);

/* The pid of the running child, or 0. */
int sg__child_pid(const sg__backend *b);

#endif
